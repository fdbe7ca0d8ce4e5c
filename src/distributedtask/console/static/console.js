// The distributedtask console: three pages (tasks, one task, members) kept current by one
// server-sent event stream (/api/events). Served by `dtask ui`; nothing comes from elsewhere.
// A unit task's page also reads its units (/api/units) when the stream says they changed.
//
// Rule of this file: every piece of data is put in the page as text (h() and text nodes) or
// as an attribute value, never as markup: no innerHTML, no insertAdjacentHTML, no
// document.write, no eval. Names may hold "<script>", quotes or bidi controls: they are shown
// literally, isolated in <bdi> so they cannot reorder the text around them.
"use strict";

(() => {
  const STATUSES = ["STARTED", "PAUSED", "FINISHED", "FAILED", "CANCELLED"];
  const GO_ZERO_TIME = "0001-01-01T00:00:00Z";
  const ROW_LIMIT = 500;
  const ACTIVITY_LIMIT = 60;
  const UNIT_STATUSES = ["COMPLETED", "IN_PROGRESS", "PENDING", "FAILED"];
  const UNIT_WORDS = { COMPLETED: "completed", IN_PROGRESS: "in progress", PENDING: "pending", FAILED: "failed" };
  const UNIT_ROW_LIMIT = 1000; // units listed per group
  const UNIT_READ_MS = 500; // a page reads its task's units at most this often
  const writes = meta("dtask-writes") === "true";
  const csrf = meta("dtask-csrf");
  const main = document.getElementById("main");

  function meta(name) {
    const found = document.querySelector(`meta[name="${name}"]`);
    return found ? found.getAttribute("content") : "";
  }

  // ---- building elements ----------------------------------------------------------------

  // h("td", {class: "x"}, "text", child): attributes by setAttribute, "on*" as listeners,
  // children as nodes or text nodes.
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // Characters that are invisible or reorder the text around them (bidi controls, zero-width
  // marks): in a name they are shown as a visible code, so "abc\u202Eevil" cannot pass for
  // "abclive". The name itself is kept whole in data-name.
  const INVISIBLE = /[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]/gu;
  const codeOf = (ch) => `U+${ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
  const visible = (text) => String(text).replace(INVISIBLE, (ch) => `⟨${codeOf(ch)}⟩`);

  function name(text) {
    text = String(text);
    const node = h("bdi", { class: "name", "data-name": text });
    let last = 0;
    for (const match of text.matchAll(INVISIBLE)) {
      if (match.index > last) node.append(text.slice(last, match.index));
      node.append(h("span", { class: "ctl", title: "an invisible character" }, codeOf(match[0])));
      last = match.index + match[0].length;
    }
    if (last < text.length) node.append(text.slice(last));
    return node;
  }
  const taskHref = (ns, id) => "/task?" + new URLSearchParams({ namespace: ns, id: id });
  const keyOf = (ns, id) => JSON.stringify([ns, id]);
  const isSet = (time) => Boolean(time) && time !== GO_ZERO_TIME;

  function statusBadge(status) {
    return h("span", { class: `status status-${String(status).toLowerCase()}` }, status);
  }

  function bar(fraction, state, label) {
    const percent = Math.round(Math.max(0, Math.min(1, Number(fraction) || 0)) * 100);
    const fill = h("span", { class: "fill" });
    fill.style.width = `${percent}%`; // CSSOM, not an inline style attribute: allowed by the CSP
    return h(
      "span",
      { class: "progress" },
      h(
        "span",
        {
          class: `bar bar-${state}`,
          role: "progressbar",
          "aria-valuemin": 0,
          "aria-valuemax": 100,
          "aria-valuenow": percent,
          "aria-label": label,
        },
        fill,
      ),
      h("span", { class: "percent" }, `${percent}%`),
    );
  }

  function age(iso) {
    if (!isSet(iso)) return "";
    const seconds = Math.max(0, Math.floor((Date.now() - Date.parse(iso)) / 1000));
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size) return `${Math.floor(seconds / size)}${unit}`;
    }
    return `${seconds}s`;
  }

  const when = (iso) => (isSet(iso) ? new Date(iso).toLocaleString() : "");
  const clock = (iso) => new Date(iso || Date.now()).toLocaleTimeString();

  function setTitle(...parts) {
    document.title = [...parts, "distributedtask console"].join(" · ");
  }

  // ---- the header: prefix, mode, connection ---------------------------------------------

  const conn = document.getElementById("conn");
  const connState = { stream: "connecting", etcd: "live", revision: 0 };

  function showConnection() {
    let text;
    let state;
    if (connState.stream !== "open") {
      state = connState.stream === "connecting" ? "connecting" : "down";
      text = state === "connecting" ? "connecting…" : "console unreachable, reconnecting…";
    } else if (connState.etcd !== "live") {
      state = "etcd-down";
      text = "etcd unreachable, reconnecting…";
    } else {
      state = "live";
      text = `live · revision ${connState.revision}`;
    }
    conn.className = `conn ${state}`;
    conn.dataset.state = state;
    conn.textContent = text;
  }

  function showStatus(status) {
    connState.etcd = status.etcd;
    connState.revision = status.revision;
    document.getElementById("prefix").textContent = status.prefix;
    showConnection();
  }

  const mode = document.getElementById("mode");
  mode.textContent = writes ? "writes enabled" : "read-only";
  mode.className = writes ? "mode writes" : "mode read-only";
  mode.title = writes
    ? "started with --allow-writes: tasks can be cancelled, paused and resumed here"
    : "start dtask ui with --allow-writes to cancel, pause and resume from here";

  // ---- the event stream -----------------------------------------------------------------

  // Follow /api/events with these handlers. The browser reconnects by itself and sends the
  // last event id it got (Last-Event-ID): the server answers with what was missed. If the
  // stream is refused outright, open a new one, naming that id in the query.
  function follow(params, handlers) {
    let lastId = "";
    let source = null;
    const open = () => {
      const query = new URLSearchParams(params);
      if (lastId) query.set("lastEventId", lastId);
      const text = query.toString();
      source = new EventSource(`/api/events${text ? `?${text}` : ""}`);
      source.addEventListener("open", () => {
        connState.stream = "open";
        showConnection();
      });
      source.addEventListener("error", () => {
        connState.stream = "down";
        showConnection();
        if (source.readyState === EventSource.CLOSED) setTimeout(open, 2000);
      });
      for (const [kind, handle] of Object.entries(handlers)) {
        source.addEventListener(kind, (event) => {
          lastId = event.lastEventId || lastId;
          const data = JSON.parse(event.data);
          if (typeof data.revision === "number" && data.revision > connState.revision) {
            connState.revision = data.revision;
            showConnection();
          }
          handle(data);
        });
      }
    };
    open();
  }

  function scheduler(render) {
    let pending = false;
    return () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        render();
      });
    };
  }

  // ---- writes ---------------------------------------------------------------------------

  const ACTIONS = {
    pause: {
      verb: "Pause",
      when: ["STARTED"],
      says: "Every node stops its run and keeps its local state, until the task is resumed.",
    },
    resume: {
      verb: "Resume",
      when: ["PAUSED"],
      says: "Every node that has not finished starts its run again.",
    },
    cancel: {
      verb: "Cancel",
      when: ["STARTED", "PAUSED"],
      says: "Every node stops its run; the task ends CANCELLED. This cannot be undone.",
      danger: true,
    },
  };

  // Ask in a dialog; resolves true only when the user confirms.
  function confirmAction(action, task) {
    const spec = ACTIONS[action];
    return new Promise((resolve) => {
      const done = (answer) => {
        dialog.close();
        dialog.remove();
        resolve(answer);
      };
      const dialog = h(
        "dialog",
        { class: "confirm", "aria-labelledby": "confirm-title" },
        h("h2", { id: "confirm-title" }, `${spec.verb} this task?`),
        h("p", {}, name(task.namespace), " / ", name(task.ID), ` version ${task.version}`),
        h("p", {}, spec.says),
        h(
          "div",
          { class: "buttons" },
          h("button", { type: "button", class: "secondary", onclick: () => done(false) }, "Keep it"),
          h(
            "button",
            {
              type: "button",
              class: spec.danger ? "danger" : "primary",
              "data-confirm": action,
              onclick: () => done(true),
            },
            `${spec.verb} task`,
          ),
        ),
      );
      dialog.addEventListener("cancel", () => done(false)); // Escape
      document.body.append(dialog);
      dialog.showModal();
    });
  }

  async function write(action, task, report) {
    if (!(await confirmAction(action, task))) return;
    report(`${ACTIONS[action].verb} requested…`, "info");
    try {
      const response = await fetch(`/api/task/${action}`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ namespace: task.namespace, id: task.ID, version: task.version }),
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) report(`${ACTIONS[action].verb}: the task is now ${body.status}.`, "ok");
      else report(`Could not ${action}: ${body.error || response.statusText}`, "error");
    } catch (error) {
      report(`Could not ${action}: ${error}`, "error");
    }
  }

  // ---- page: tasks ----------------------------------------------------------------------

  const COLUMNS = [
    { key: "namespace", label: "Namespace", sort: "name" },
    { key: "ID", label: "ID" },
    { key: "version", label: "Version", sort: "version" },
    { key: "status", label: "Status", sort: "status" },
    { key: "progress", label: "Progress", sort: "progress" },
    { key: "nodes", label: "Nodes done" },
    { key: "attempts", label: "Failed attempts" },
    { key: "startedAt", label: "Age", sort: "started" },
  ];
  const SORTS = {
    name: (a, b) => cmp(a.namespace, b.namespace) || cmp(a.ID, b.ID),
    version: (a, b) => b.version - a.version,
    status: (a, b) => cmp(a.status, b.status) || SORTS.name(a, b),
    progress: (a, b) => a.progress - b.progress || SORTS.name(a, b),
    started: (a, b) => cmp(b.startedAt, a.startedAt) || SORTS.name(a, b),
  };
  const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

  function tasksPage() {
    setTitle("Tasks");
    const params = new URLSearchParams(location.search);
    const view = {
      namespace: params.get("namespace") || "",
      status: STATUSES.includes(params.get("status")) ? params.get("status") : "",
      sort: SORTS[(params.get("sort") || "").replace(/^-/, "")] ? params.get("sort") : "name",
      search: params.get("q") || "",
    };
    const tasks = new Map();
    const activity = [];

    const counts = h("div", { class: "counts", role: "group", "aria-label": "status" });
    const namespaceSelect = h("select", { id: "namespace-filter", "aria-label": "namespace" });
    const searchBox = h("input", {
      type: "search",
      id: "search",
      placeholder: "filter by id",
      "aria-label": "filter by id",
      value: view.search,
    });
    const head = h("thead");
    const body = h("tbody");
    const footer = h("p", { class: "note", id: "table-note" });
    const activityList = h("ol", { class: "activity", id: "activity" });

    main.replaceChildren(
      h("h1", {}, "Tasks"),
      counts,
      h(
        "div",
        { class: "filters" },
        h("label", { for: "namespace-filter" }, "Namespace "),
        namespaceSelect,
        searchBox,
      ),
      h("div", { class: "table-wrap" }, h("table", { class: "tasks", id: "tasks" }, head, body)),
      footer,
      h(
        "section",
        { class: "recent" },
        h("h2", {}, "Recent changes ", h("small", {}, "since this page opened")),
        activityList,
      ),
    );

    namespaceSelect.addEventListener("change", () => {
      view.namespace = namespaceSelect.value;
      update();
    });
    searchBox.addEventListener("input", () => {
      view.search = searchBox.value;
      update();
    });

    function remember() {
      const query = new URLSearchParams();
      if (view.namespace) query.set("namespace", view.namespace);
      if (view.status) query.set("status", view.status);
      if (view.sort !== "name") query.set("sort", view.sort);
      if (view.search) query.set("q", view.search);
      const text = query.toString();
      history.replaceState(null, "", text ? `/?${text}` : "/");
    }

    function renderHead() {
      const [sortKey, descending] = [view.sort.replace(/^-/, ""), view.sort.startsWith("-")];
      head.replaceChildren(
        h(
          "tr",
          {},
          COLUMNS.map((column) => {
            if (!column.sort) return h("th", { scope: "col" }, column.label);
            const active = column.sort === sortKey;
            return h(
              "th",
              { scope: "col", "aria-sort": active ? (descending ? "descending" : "ascending") : null },
              h(
                "button",
                {
                  type: "button",
                  class: "sort",
                  "data-sort": column.sort,
                  onclick: () => {
                    view.sort = active && !descending ? `-${column.sort}` : column.sort;
                    update();
                  },
                },
                column.label,
                active ? (descending ? " ▼" : " ▲") : "",
              ),
            );
          }),
        ),
      );
    }

    function render() {
      remember();
      const all = [...tasks.values()];
      const namespaces = [...new Set(all.map((task) => task.namespace))].sort(cmp);
      if (view.namespace && !namespaces.includes(view.namespace)) namespaces.push(view.namespace);
      namespaceSelect.replaceChildren(
        h("option", { value: "" }, "all"),
        ...namespaces.map((ns) => h("option", { value: ns, selected: ns === view.namespace }, visible(ns))),
      );
      const inNamespace = all.filter((task) => !view.namespace || task.namespace === view.namespace);
      const chip = (status, count) =>
        h(
          "button",
          {
            type: "button",
            class: `chip ${status ? `chip-${status.toLowerCase()}` : ""}`,
            "aria-pressed": String(view.status === status),
            "data-status": status || "ALL",
            onclick: () => {
              view.status = view.status === status ? "" : status;
              update();
            },
          },
          status || "All",
          h("span", { class: "count" }, String(count)),
        );
      counts.replaceChildren(
        chip("", inNamespace.length),
        ...STATUSES.map((status) =>
          chip(status, inNamespace.filter((task) => task.status === status).length),
        ),
      );
      const search = view.search.toLowerCase();
      const shown = inNamespace.filter(
        (task) =>
          (!view.status || task.status === view.status) &&
          (!search || task.ID.toLowerCase().includes(search)),
      );
      const order = SORTS[view.sort.replace(/^-/, "")];
      shown.sort(view.sort.startsWith("-") ? (a, b) => order(b, a) : order);
      renderHead();
      body.replaceChildren(...shown.slice(0, ROW_LIMIT).map(taskRow));
      if (!all.length) footer.textContent = "No tasks under this prefix yet. Tasks appear here as they are added.";
      else if (!shown.length) footer.textContent = "No task matches these filters.";
      else if (shown.length > ROW_LIMIT) footer.textContent = `Showing ${ROW_LIMIT} of ${shown.length} tasks: filter to see the others.`;
      else footer.textContent = `${shown.length} of ${all.length} tasks.`;
    }

    function taskRow(task) {
      const state = task.status === "FINISHED" ? "done" : task.status.toLowerCase();
      return h(
        "tr",
        { class: `row-${task.status.toLowerCase()}` },
        h("td", { class: "ns" }, name(task.namespace)),
        h("td", { class: "id" }, h("a", { href: taskHref(task.namespace, task.ID) }, name(task.ID))),
        h("td", { class: "num" }, String(task.version)),
        h("td", {}, statusBadge(task.status)),
        h("td", { class: "progress-cell" }, bar(task.progress, state, `progress of ${task.ID}`)),
        h("td", { class: "num" }, `${task.finishedCount}/${task.nodeCount}`),
        h("td", { class: task.failedAttempts ? "warn" : "muted" }, task.failedAttempts || "–"),
        h("td", { title: when(task.startedAt) }, age(task.startedAt)),
      );
    }

    function renderActivity() {
      activityList.replaceChildren(
        ...activity.map((entry) =>
          h(
            "li",
            {},
            h("time", { datetime: entry.at }, clock(entry.at)),
            " ",
            entry.namespace !== null
              ? h(
                  "span",
                  {},
                  h("a", { href: taskHref(entry.namespace, entry.ID) }, name(entry.namespace), "/", name(entry.ID)),
                  " ",
                  entry.what,
                )
              : entry.line,
          ),
        ),
      );
      if (!activity.length) activityList.append(h("li", { class: "muted" }, "Nothing yet."));
    }

    const update = scheduler(render);
    follow(
      {},
      {
        snapshot: (data) => {
          tasks.clear();
          for (const task of data.tasks) tasks.set(keyOf(task.namespace, task.ID), task);
          showStatus(data.status);
          update();
        },
        task: (data) => {
          tasks.set(keyOf(data.task.namespace, data.task.ID), data.task);
          update();
        },
        removed: (data) => {
          tasks.delete(keyOf(data.namespace, data.ID));
          update();
        },
        transition: (data) => {
          activity.unshift(data);
          activity.length = Math.min(activity.length, ACTIVITY_LIMIT);
          renderActivity();
        },
        status: showStatus,
      },
    );
    renderActivity();
    setInterval(update, 5000); // ages move on; nothing is fetched
  }

  // ---- page: one task -------------------------------------------------------------------

  function taskPage() {
    const params = new URLSearchParams(location.search);
    const ns = params.get("namespace");
    const id = params.get("id");
    if (!ns || !id) {
      main.replaceChildren(h("p", { class: "error" }, "This page needs ?namespace=…&id=…"));
      return;
    }
    setTitle(visible(`${ns}/${id}`));
    let task = null;
    const rows = new Map();
    const timeline = [];
    const heading = h("h1", { class: "task-title" });
    const facts = h("dl", { class: "facts" });
    const actions = h("div", { class: "actions" });
    const message = h("p", { class: "message", id: "message", role: "status", "aria-live": "polite" });
    const nodesHead = h("tr");
    const nodesBody = h("tbody");
    const timelineList = h("ol", { class: "timeline", id: "timeline" });
    const missing = h("p", { class: "missing", hidden: true });
    const unitsTitle = h("h2", {}, "Units");
    const unitTotals = h("p", { class: "unit-totals", id: "unit-totals" });
    const unitGroups = h("div", { class: "unit-groups", id: "unit-groups" });
    const unitsNote = h("p", { class: "note", id: "units-note" });
    const unitsSection = h("section", { id: "units", hidden: true }, unitsTitle, unitTotals, unitGroups, unitsNote);
    const openGroups = new Set(); // the groups whose list of units is expanded
    let units = null; // the last read of /api/units
    let unitsError = "";
    const content = h(
      "div",
      { id: "task" },
      facts,
      actions,
      message,
      unitsSection,
      h("h2", {}, "Nodes"),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "nodes", id: "nodes" },
          h("thead", {}, nodesHead),
          nodesBody,
        ),
      ),
    );
    main.replaceChildren(
      h("nav", { class: "crumbs", "aria-label": "breadcrumbs" }, h("a", { href: "/" }, "Tasks"), " › ", name(ns)),
      heading,
      missing,
      content,
      h(
        "section",
        {},
        h("h2", {}, "Timeline ", h("small", {}, "since this page opened")),
        timelineList,
      ),
    );

    function report(text, kind) {
      message.textContent = text;
      message.className = `message message-${kind}`;
    }

    function note(text, at) {
      timeline.push({ at: at || new Date().toISOString(), text });
      timelineList.replaceChildren(
        ...timeline.map((entry) =>
          h("li", {}, h("time", { datetime: entry.at }, clock(entry.at)), " ", entry.text),
        ),
      );
    }

    function fact(label, ...value) {
      return [h("dt", {}, label), h("dd", {}, ...value)];
    }

    function render() {
      heading.replaceChildren(name(ns), h("span", { class: "sep" }, " / "), name(id), " ");
      if (!task) {
        heading.append(statusBadge("ABSENT"));
        missing.hidden = false;
        missing.textContent = "There is no such task (yet): this page shows it as soon as it is added.";
        content.hidden = true;
        return;
      }
      missing.hidden = true;
      content.hidden = false;
      heading.append(statusBadge(task.status));
      const state = task.status === "FINISHED" ? "done" : task.status.toLowerCase();
      const policy = task.policy || {};
      const per = task.unitCount ? "unit" : "node"; // a unit task's attempts are its units'
      const policyText = [
        policy.maxAttempts ? `${policy.maxAttempts} attempts per ${per}` : `1 attempt per ${per}`,
        policy.retryBackoff !== undefined ? `backoff ${policy.retryBackoff}s` : null,
        policy.retryBackoffMax !== undefined ? `up to ${policy.retryBackoffMax}s` : null,
        policy.deadline !== undefined ? `deadline ${policy.deadline}s` : null,
      ]
        .filter(Boolean)
        .join(", ");
      const unitsRead = task.unitCount && units && units.version === task.version ? units : null;
      let failedAttempts = task.failedAttempts || "none";
      if (unitsRead) {
        const retried = unitsRead.groups.flatMap((group) => group.units).filter((unit) => unit.attempts > 0);
        const count = retried.reduce((sum, unit) => sum + unit.attempts, 0);
        failedAttempts = retried.length
          ? `${count} failed on ${retried.length} unit${retried.length === 1 ? "" : "s"}`
          : "none";
      }
      facts.replaceChildren(
        ...fact("Version", String(task.version)),
        ...(task.unitCount
          ? [
              ...fact(
                "Progress",
                bar(unitsRead ? unitsRead.counts.COMPLETED / (unitsRead.total || 1) : 0, state, "progress of the task"),
              ),
              ...fact("Units done", unitsRead ? `${unitsRead.counts.COMPLETED} of ${unitsRead.total}` : `? of ${task.unitCount}`),
            ]
          : [
              ...fact("Progress", bar(task.progress, state, "progress of the task")),
              ...fact("Nodes done", `${task.finishedCount} of ${task.nodeCount}`),
            ]),
        ...fact("Started", when(task.startedAt), h("span", { class: "muted" }, ` (${age(task.startedAt)} ago)`)),
        ...(isSet(task.finishedAt) ? fact("Ended", when(task.finishedAt)) : []),
        ...(task.error ? fact("Error", h("span", { class: "error-text" }, task.error)) : []),
        ...(task.failedNode ? fact("Failed on", name(task.failedNode)) : []),
        ...(task.failedUnit ? fact("Failed unit", name(task.failedUnit)) : []),
        ...fact("Failed attempts", failedAttempts),
        ...fact("Run policy", policyText),
        ...fact("Payload", `${task.payloadBytes} bytes`),
      );
      actions.replaceChildren();
      if (writes) {
        for (const [action, spec] of Object.entries(ACTIONS)) {
          if (!spec.when.includes(task.status)) continue;
          actions.append(
            h(
              "button",
              {
                type: "button",
                class: spec.danger ? "danger" : "primary",
                "data-action": action,
                onclick: () => write(action, task, report),
              },
              spec.verb,
            ),
          );
        }
      }
      renderUnits();
      // A unit task's nodes: also the units each completed and holds (from the last read).
      const unitsOf = (node) => {
        if (!unitsRead) return "";
        const held = unitsRead.inProgressByNode[node] || 0;
        return `${unitsRead.completedByNode[node] || 0} completed${held ? `, ${held} in progress` : ""}`;
      };
      nodesHead.replaceChildren(
        ...["Node", "State", "Progress", "Message", ...(task.unitCount ? ["Units"] : []), "Failed attempts", "Last error"].map(
          (label) => h("th", { scope: "col" }, label),
        ),
      );
      nodesBody.replaceChildren(
        ...[...rows.values()]
          .sort((a, b) => cmp(a.node, b.node))
          .map((row) =>
            h(
              "tr",
              { class: `node-${row.state}` },
              h("td", {}, name(row.node)),
              h("td", {}, h("span", { class: `state state-${row.state}` }, row.state)),
              h("td", { class: "progress-cell" }, bar(row.fraction, row.state, `progress of ${row.node}`)),
              h("td", { class: "message-cell" }, row.message),
              task.unitCount ? h("td", { class: "units-cell" }, unitsOf(row.node)) : null,
              h("td", { class: "num" }, String(row.attempts)),
              h("td", { class: "error-text" }, row.lastError || ""),
            ),
          ),
      );
    }

    // ---- units: counts by group, and each group's units on demand ----

    function unitCounts(counts) {
      return h(
        "span",
        { class: "unit-counts" },
        UNIT_STATUSES.map((status) =>
          h(
            "span",
            { class: `ucount ucount-${status.toLowerCase()}`, "data-status": status },
            h("span", { class: "n" }, String(counts[status] || 0)),
            ` ${UNIT_WORDS[status]}`,
          ),
        ),
      );
    }

    function unitState(status) {
      return h("span", { class: `state ustate-${status.toLowerCase()}` }, UNIT_WORDS[status] || status);
    }

    function unitTable(group) {
      const shown = group.units.slice(0, UNIT_ROW_LIMIT);
      return [
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { class: "units" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                ["Unit", "Status", "Node", "Failed attempts", "Progress", "Message", "Error"].map((label) =>
                  h("th", { scope: "col" }, label),
                ),
              ),
            ),
            h(
              "tbody",
              {},
              shown.map((unit) => {
                const done = unit.status === "COMPLETED";
                const fraction = done ? 1 : unit.progress ? unit.progress.fraction : 0;
                const barState = done ? "done" : unit.status === "FAILED" ? "failed" : "running";
                return h(
                  "tr",
                  { class: `unit-row unit-${unit.status.toLowerCase()}`, "data-unit": unit.id },
                  h("td", {}, name(unit.id)),
                  h("td", {}, unitState(unit.status)),
                  h("td", {}, unit.node === null ? h("span", { class: "muted" }, "–") : name(unit.node)),
                  h("td", { class: "num" }, String(unit.attempts)),
                  h("td", { class: "progress-cell" }, bar(fraction, barState, `progress of unit ${unit.id}`)),
                  h("td", { class: "message-cell" }, unit.progress ? unit.progress.message : ""),
                  h("td", { class: "error-text" }, unit.error || ""),
                );
              }),
            ),
          ),
        ),
        shown.length < group.units.length
          ? h("p", { class: "note" }, `Showing ${shown.length} of ${group.units.length} units of this group.`)
          : null,
      ];
    }

    function groupBlock(group) {
      const counts = group.counts;
      let state = "running";
      if (counts.FAILED) state = "failed";
      else if (counts.COMPLETED === group.total) state = "done";
      else if (task.status === "PAUSED") state = "paused";
      const list = h("div", { class: "unit-list" });
      const details = h(
        "details",
        { class: "unit-details", open: openGroups.has(group.group) },
        h("summary", {}, `${group.total} unit${group.total === 1 ? "" : "s"}`),
        list,
      );
      const fill = () => {
        if (details.open && !list.firstChild) list.append(...unitTable(group).filter(Boolean));
      };
      details.addEventListener("toggle", () => {
        if (details.open) openGroups.add(group.group);
        else openGroups.delete(group.group);
        fill();
      });
      fill();
      return h(
        "div",
        { class: "unit-group", "data-group": group.group },
        h(
          "div",
          { class: "group-head" },
          h("span", { class: "group-name" }, group.group ? name(group.group) : h("span", { class: "muted" }, group.label)),
          bar(group.total ? counts.COMPLETED / group.total : 0, state, `completed units of ${group.label}`),
          unitCounts(counts),
        ),
        details,
      );
    }

    function renderUnits() {
      if (!task || !task.unitCount) {
        unitsSection.hidden = true;
        return;
      }
      unitsSection.hidden = false;
      unitsTitle.replaceChildren("Units ", h("span", { class: "count" }, String(task.unitCount)));
      if (!units || units.version !== task.version) {
        unitTotals.replaceChildren();
        unitGroups.replaceChildren();
        unitsNote.textContent = unitsError ? `Could not read the units: ${unitsError}` : "Reading the units…";
        return;
      }
      unitsNote.textContent = unitsError ? `Could not read the units again (${unitsError}): these are from the last read.` : "";
      const groups = units.groups.length;
      unitTotals.replaceChildren(
        `${units.total} unit${units.total === 1 ? "" : "s"} in ${groups} group${groups === 1 ? "" : "s"}: `,
        unitCounts(units.counts),
      );
      unitGroups.replaceChildren(...units.groups.map(groupBlock));
    }

    // Read the units now, or as soon as the last read is UNIT_READ_MS old; one read at a time,
    // and a change during a read makes one more.
    const readUnits = (() => {
      let busy = false;
      let again = false;
      let timer = null;
      let last = 0;
      async function read() {
        timer = null;
        busy = true;
        again = false;
        last = Date.now();
        try {
          const query = new URLSearchParams({ namespace: ns, id: id });
          const response = await fetch(`/api/units?${query}`, { credentials: "same-origin" });
          const body = await response.json().catch(() => ({}));
          if (response.ok) {
            units = body;
            unitsError = "";
          } else if (response.status === 404) {
            units = null; // gone, or replaced by a run without units: the stream says which
            unitsError = "";
          } else {
            unitsError = body.error || response.statusText;
          }
        } catch (error) {
          unitsError = String(error);
        }
        busy = false;
        update();
        if (again) request();
      }
      function request() {
        if (!task || !task.unitCount) return;
        if (busy) {
          again = true;
          return;
        }
        if (timer === null) timer = setTimeout(read, Math.max(0, last + UNIT_READ_MS - Date.now()));
      }
      return request;
    })();

    function take(full) {
      const before = task;
      task = full;
      rows.clear();
      if (full) for (const row of full.nodeStates) rows.set(row.node, row);
      return before;
    }

    const update = scheduler(render);
    let opened = false;
    follow(
      { namespace: ns, id: id },
      {
        snapshot: (data) => {
          const before = take(data.task);
          showStatus(data.status);
          if (!opened) {
            opened = true;
            const done = task && task.unitCount ? `${task.unitCount} units` : task ? `${task.finishedCount} of ${task.nodeCount} nodes done` : "";
            note(task ? `page opened: ${task.status}, version ${task.version}, ${done}` : "page opened: no such task");
          } else if ((before && before.status) !== (task && task.status)) {
            note(`state reloaded: ${task ? task.status : "no such task"}`);
          }
          readUnits();
          update();
        },
        task: (data) => {
          if (data.task.namespace !== ns || data.task.ID !== id) return;
          task = data.task; // its node rows come in "nodes" events
          readUnits();
          update();
        },
        units: (data) => {
          if (data.namespace === ns && data.ID === id) readUnits();
        },
        removed: (data) => {
          if (data.namespace !== ns || data.ID !== id) return;
          take(null);
          update();
        },
        nodes: (data) => {
          if (data.namespace !== ns || data.ID !== id) return;
          if (data.reset) rows.clear();
          for (const row of data.nodes) rows.set(row.node, row);
          update();
        },
        transition: (data) => {
          if (data.namespace === ns && data.ID === id) note(data.what, data.at);
        },
        status: showStatus,
      },
    );
    setInterval(update, 5000);
  }

  // ---- page: members --------------------------------------------------------------------

  function membersPage() {
    setTitle("Members");
    let members = [];
    const body = h("tbody");
    const heading = h("h1", {}, "Members");
    const note = h("p", { class: "note" });
    main.replaceChildren(
      heading,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "members", id: "members" },
          h(
            "thead",
            {},
            h("tr", {}, ["Node", "Namespaces", "Up", "Since", "Lease"].map((label) => h("th", { scope: "col" }, label))),
          ),
          body,
        ),
      ),
      note,
    );
    function render() {
      heading.replaceChildren("Members ", h("span", { class: "count" }, String(members.length)));
      body.replaceChildren(
        ...members.map((member) =>
          h(
            "tr",
            {},
            h("td", {}, name(member.node)),
            h("td", {}, member.namespaces.map((ns, i) => [i ? ", " : "", name(ns)])),
            h("td", {}, age(member.startedAt)),
            h("td", {}, when(member.startedAt)),
            h("td", { class: "mono" }, member.lease || "–"),
          ),
        ),
      );
      note.textContent = members.length
        ? "Each member is a live Scheduler; its key is bound to its lease and goes when the lease expires."
        : "No live member: no Scheduler serves this prefix right now.";
    }
    const update = scheduler(render);
    follow(
      {},
      {
        snapshot: (data) => {
          members = data.members;
          showStatus(data.status);
          update();
        },
        members: (data) => {
          members = data.members;
          update();
        },
        status: showStatus,
      },
    );
    setInterval(update, 5000);
  }

  // ---- which page -----------------------------------------------------------------------

  const pages = { "/": ["tasks", tasksPage], "/task": ["tasks", taskPage], "/members": ["members", membersPage] };
  const [section, page] = pages[location.pathname] || pages["/"];
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    if (link.dataset.page === section) link.setAttribute("aria-current", "page");
  }
  page();
})();
