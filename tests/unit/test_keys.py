"""Unit tests of the key schema (src/distributedtask/keys.py): building, exact parsing, escaping,
prefix isolation and etcd range ends. Pure; no etcd."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distributedtask.exceptions import InvalidTaskError
from distributedtask.keys import (
    Keys,
    MemberKey,
    OutcomeKey,
    ProgressKey,
    RunKey,
    TaskKey,
    prefix_range_end,
)
from distributedtask.model import validate_name

ParsedKey = TaskKey | OutcomeKey | RunKey | ProgressKey | MemberKey

K = Keys("/dt")


def valid(name: str) -> bool:
    try:
        validate_name(name, "x")
    except InvalidTaskError:
        return False
    return True


names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40).filter(
    valid
)
versions = st.integers(min_value=1, max_value=2**63 - 1)


def build(keys: Keys, parsed: ParsedKey) -> bytes:
    """The key ``keys`` builds for a parsed key."""
    if isinstance(parsed, TaskKey):
        return keys.task(parsed.namespace, parsed.task_id)
    if isinstance(parsed, OutcomeKey):
        return keys.outcome(parsed.namespace, parsed.task_id)
    if isinstance(parsed, RunKey):
        return keys.run(parsed.namespace, parsed.task_id, parsed.node_id)
    if isinstance(parsed, ProgressKey):
        return keys.progress(parsed.namespace, parsed.task_id, parsed.version, parsed.node_id)
    return keys.member(parsed.node_id)


def in_range(key: bytes, prefix: bytes) -> bool:
    """Whether etcd's range ``[prefix, prefix_range_end(prefix))`` holds ``key``."""
    return prefix <= key < prefix_range_end(prefix)


# ---- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/", "//", "///"])
def test_empty_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError):
        Keys(prefix)


@pytest.mark.parametrize("prefix", [None, 5, b"/dt"])
def test_non_str_prefix_is_rejected(prefix: object) -> None:
    with pytest.raises(ValueError):
        Keys(prefix)  # type: ignore[arg-type]


def test_trailing_slash_of_prefix_is_ignored() -> None:
    a, b, c = Keys("/p"), Keys("/p/"), Keys("/p//")
    assert a.prefix == b.prefix == c.prefix == "/p"
    assert a.root == b.root == c.root == b"/p/"
    for keys in (b, c):
        assert keys.task("ns", "id") == a.task("ns", "id")
        assert keys.member("n") == a.member("n")
        assert keys.parse(a.task("ns", "id")) == TaskKey("ns", "id")


def test_repr() -> None:
    assert repr(Keys("/p/")) == "Keys('/p')"


def test_key_layout() -> None:
    assert K.task("ns", "id") == b"/dt/tasks/ns/id"
    assert K.outcome("ns", "id") == b"/dt/outcomes/ns/id"
    assert K.task_runs("ns", "id") == b"/dt/runs/ns/id/"
    assert K.run("ns", "id", "node") == b"/dt/runs/ns/id/node"
    assert K.task_progress("ns", "id") == b"/dt/progress/ns/id/"
    assert K.version_progress("ns", "id", 7) == b"/dt/progress/ns/id/7/"
    assert K.progress("ns", "id", 7, "node") == b"/dt/progress/ns/id/7/node"
    assert K.member("node") == b"/dt/members/node"
    assert K.all_tasks() == b"/dt/tasks/"
    assert K.all_outcomes() == b"/dt/outcomes/"
    assert K.all_runs() == b"/dt/runs/"
    assert K.task_progress_root() == b"/dt/progress/"
    assert K.all_members() == b"/dt/members/"


def test_builders_return_bytes() -> None:
    for key in (
        K.task("a", "b"),
        K.outcome("a", "b"),
        K.task_runs("a", "b"),
        K.run("a", "b", "c"),
        K.task_progress("a", "b"),
        K.version_progress("a", "b", 1),
        K.progress("a", "b", 1, "c"),
        K.member("c"),
    ):
        assert isinstance(key, bytes)
        assert key.startswith(K.root)


def test_names_are_percent_encoded() -> None:
    assert K.task("a/b", "c d") == b"/dt/tasks/a%2Fb/c%20d"
    assert K.member("100%") == b"/dt/members/100%25"
    assert K.member("é") == b"/dt/members/%C3%A9"
    assert K.member("a-b_c.d~e") == b"/dt/members/a-b_c.d~e"


def test_non_ascii_prefix() -> None:
    keys = Keys("/日本/dt")
    key = keys.task("ns", "id")
    assert key == "/日本/dt/tasks/ns/id".encode()
    assert keys.parse(key) == TaskKey("ns", "id")


def test_prefix_without_leading_slash() -> None:
    keys = Keys("dt")
    assert keys.task("a", "b") == b"dt/tasks/a/b"
    assert keys.parse(b"dt/tasks/a/b") == TaskKey("a", "b")
    assert K.parse(b"dt/tasks/a/b") is None
    assert keys.parse(b"/dt/tasks/a/b") is None


# ---- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        (b"/dt/tasks/ns/id", TaskKey("ns", "id")),
        (b"/dt/outcomes/ns/id", OutcomeKey("ns", "id")),
        (b"/dt/runs/ns/id/node", RunKey("ns", "id", "node")),
        (b"/dt/progress/ns/id/12/node", ProgressKey("ns", "id", 12, "node")),
        (b"/dt/members/node", MemberKey("node")),
        (b"/dt/tasks/a%2Fb/c", TaskKey("a/b", "c")),
        (b"/dt/tasks/a/b%2Fc", TaskKey("a", "b/c")),
        (b"/dt/members/%25", MemberKey("%")),
    ],
)
def test_parse(key: bytes, parsed: ParsedKey) -> None:
    assert K.parse(key) == parsed


@pytest.mark.parametrize(
    ("namespace", "task_id", "node_id"),
    [
        ("a/b", "c", "d"),
        ("/", "//", "/n/"),
        ("%", "%25", "%2F"),
        ("100% done", "a%b", "%%"),
        ("with space", " lead", "trail "),
        ("ünïcödé", "日本語", "🎉"),
        ("a+b", "a?b#c", "a&b=c"),
        ("~", ".", ".."),
        ("x" * 256, "é" * 128, "🎉" * 64),
    ],
)
def test_awkward_names_round_trip(namespace: str, task_id: str, node_id: str) -> None:
    assert K.parse(K.task(namespace, task_id)) == TaskKey(namespace, task_id)
    assert K.parse(K.outcome(namespace, task_id)) == OutcomeKey(namespace, task_id)
    assert K.parse(K.run(namespace, task_id, node_id)) == RunKey(namespace, task_id, node_id)
    progress = K.progress(namespace, task_id, 3, node_id)
    assert K.parse(progress) == ProgressKey(namespace, task_id, 3, node_id)
    assert K.parse(K.member(node_id)) == MemberKey(node_id)


def test_slash_in_names_cannot_forge_another_key() -> None:
    assert K.task("a/b", "c") != K.task("a", "b/c")
    assert K.outcome("a/b", "c") != K.outcome("a", "b/c")
    assert K.run("a/b", "c", "d") != K.run("a", "b/c", "d")
    assert K.run("a", "b/c", "d") != K.run("a", "b", "c/d")
    assert K.progress("a", "b", 1, "c") != K.progress("a", "b/1", 1, "c")
    assert K.parse(K.task("a/b", "c")) == TaskKey("a/b", "c")
    assert K.parse(K.task("a", "b/c")) == TaskKey("a", "b/c")
    # the run keys of (a/b, c) never fall in the range of (a, b) or vice versa
    assert not in_range(K.run("a/b", "c", "d"), K.task_runs("a", "b"))
    assert not in_range(K.run("a", "b/c", "d"), K.task_runs("a", "b"))


def test_task_id_prefix_never_covers_a_longer_id() -> None:
    assert not K.task_runs("ns", "ab").startswith(K.task_runs("ns", "a"))
    assert not in_range(K.run("ns", "ab", "node"), K.task_runs("ns", "a"))
    assert in_range(K.run("ns", "a", "node"), K.task_runs("ns", "a"))
    assert not in_range(K.progress("ns", "ab", 1, "n"), K.task_progress("ns", "a"))
    assert not in_range(K.run("nsx", "a", "node"), K.task_runs("ns", "a"))
    # version 1 never covers version 10
    assert not in_range(K.progress("ns", "a", 10, "n"), K.version_progress("ns", "a", 1))
    assert in_range(K.progress("ns", "a", 1, "n"), K.version_progress("ns", "a", 1))
    assert in_range(K.version_progress("ns", "a", 1), K.task_progress("ns", "a"))


def test_kinds_never_share_a_range() -> None:
    roots = [K.all_tasks(), K.all_outcomes(), K.all_runs(), K.task_progress_root()]
    roots.append(K.all_members())
    samples = [
        K.task("a", "b"),
        K.outcome("a", "b"),
        K.run("a", "b", "c"),
        K.progress("a", "b", 1, "c"),
        K.member("c"),
    ]
    for i, root in enumerate(roots):
        for j, key in enumerate(samples):
            assert in_range(key, root) == (i == j), (root, key)
            assert in_range(key, K.root)


@pytest.mark.parametrize(
    "key",
    [
        b"",
        b"/",
        b"/dt",
        b"/dt/",
        b"/dtx/tasks/a/b",
        b"/d/tasks/a/b",
        b"dt/tasks/a/b",
        b"/DT/tasks/a/b",
        b"/other/tasks/a/b",
        b"/dt/unknown/a/b",
        b"/dt/tasks",
        b"/dt/tasks/",
        b"/dt/tasks/a",
        b"/dt/tasks/a/",
        b"/dt/tasks//b",
        b"/dt/tasks/a/b/",
        b"/dt/tasks/a/b/c",
        b"/dt/outcomes/a",
        b"/dt/outcomes/a/b/c",
        b"/dt/runs/a/b",
        b"/dt/runs/a/b/",
        b"/dt/runs/a//c",
        b"/dt/runs/a/b/c/d",
        b"/dt/progress/a/b/1",
        b"/dt/progress/a/b/1/",
        b"/dt/progress/a/b//n",
        b"/dt/progress/a/b/x/n",
        b"/dt/progress/a/b/-1/n",
        b"/dt/progress/a/b/+1/n",
        b"/dt/progress/a/b/01/n",
        b"/dt/progress/a/b/1.0/n",
        b"/dt/progress/a/b/%31/n",
        b"/dt/progress/a/b/1/n/x",
        b"/dt/members",
        b"/dt/members/",
        b"/dt/members/a/b",
        b"/dt/Tasks/a/b",
        b"/dt//tasks/a/b",
    ],
)
def test_parse_rejects_wrong_shapes(key: bytes) -> None:
    assert K.parse(key) is None


@pytest.mark.parametrize(
    "segment",
    [
        b"%",  # truncated escape
        b"%2",
        b"%zz",  # not hex
        b"%G1",
        b"a%",
        b"%2f",  # lowercase hex: quote writes %2F
        b"%c3%a9",  # lowercase é
        b"%41",  # "A" never needs escaping
        b"%7E",  # "~" is safe for quote
        b"%2E",  # "."
        b"a b",  # quote escapes a space
        b"a!b",  # ... and "!"
        b"a+b",
        b"a:b",
        b"a@b",
        b"a*b",
        b"a'b",
        b"a(b)",
        b"%FF",  # escapes of bytes that are not UTF-8
        b"%C3",
        b"%C3%28",
        b"%ED%A0%80",  # an encoded surrogate
        b"\xc3\xa9",  # raw UTF-8: quote would escape it
        b"\xff",  # raw non-UTF-8
        b"\x00",
        b"",
    ],
)
def test_parse_rejects_non_canonical_or_bad_segments(segment: bytes) -> None:
    for key in (
        b"/dt/tasks/" + segment + b"/id",
        b"/dt/tasks/ns/" + segment,
        b"/dt/outcomes/" + segment + b"/id",
        b"/dt/runs/ns/id/" + segment,
        b"/dt/runs/" + segment + b"/id/node",
        b"/dt/progress/ns/" + segment + b"/1/node",
        b"/dt/progress/ns/id/1/" + segment,
        b"/dt/members/" + segment,
    ):
        assert K.parse(key) is None, key


def test_canonical_escapes_parse() -> None:
    assert K.parse(b"/dt/members/%2F") == MemberKey("/")
    assert K.parse(b"/dt/members/%C3%A9") == MemberKey("é")
    assert K.parse(b"/dt/members/%20") == MemberKey(" ")


def test_parse_rejects_keys_of_other_prefixes() -> None:
    for other in (Keys("/other"), Keys("/dtx"), Keys("/d"), Keys("dt"), Keys("/x/dt")):
        for key in (
            other.task("a", "b"),
            other.outcome("a", "b"),
            other.run("a", "b", "c"),
            other.progress("a", "b", 1, "c"),
            other.member("c"),
        ):
            assert K.parse(key) is None, (other, key)
            assert not in_range(key, K.root)


@pytest.mark.parametrize(
    "prefix", ["/dt/runs", "/dt/tasks", "/dt/members", "/dt/outcomes", "/dt/progress", "/runs/x"]
)
def test_a_prefix_that_could_nest_inside_another_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="reserved segment"):
        Keys(prefix)


def test_parse_rejects_keys_of_a_nested_prefix() -> None:
    for other in (Keys("/dt/x"), Keys("/dt/runs-x"), Keys("/dt/tasksx")):
        for key in (other.task("a", "b"), other.member("c"), other.run("a", "b", "c")):
            assert K.parse(key) is None, (other, key)


# ---- properties -------------------------------------------------------------------------------


@given(names, names, names, versions)
@settings(max_examples=200, deadline=None, database=None)
def test_every_valid_name_round_trips(ns: str, tid: str, node: str, version: int) -> None:
    assert K.parse(K.task(ns, tid)) == TaskKey(ns, tid)
    assert K.parse(K.outcome(ns, tid)) == OutcomeKey(ns, tid)
    assert K.parse(K.run(ns, tid, node)) == RunKey(ns, tid, node)
    assert K.parse(K.progress(ns, tid, version, node)) == ProgressKey(ns, tid, version, node)
    assert K.parse(K.member(node)) == MemberKey(node)
    assert in_range(K.run(ns, tid, node), K.task_runs(ns, tid))
    assert in_range(K.progress(ns, tid, version, node), K.version_progress(ns, tid, version))
    assert in_range(K.version_progress(ns, tid, version), K.task_progress(ns, tid))


@given(names, names, names, names)
@settings(max_examples=100, deadline=None, database=None)
def test_distinct_tasks_have_disjoint_ranges(ns1: str, id1: str, ns2: str, id2: str) -> None:
    assume((ns1, id1) != (ns2, id2))
    assert K.task(ns1, id1) != K.task(ns2, id2)
    assert not in_range(K.task_runs(ns2, id2), K.task_runs(ns1, id1))
    assert not in_range(K.run(ns2, id2, "n"), K.task_runs(ns1, id1))
    assert not in_range(K.progress(ns2, id2, 1, "n"), K.task_progress(ns1, id1))


@given(versions, versions)
@settings(max_examples=50, deadline=None, database=None)
def test_distinct_versions_have_disjoint_ranges(v1: int, v2: int) -> None:
    assume(v1 != v2)
    assert not in_range(K.progress("a", "b", v2, "n"), K.version_progress("a", "b", v1))


@given(st.binary(max_size=80))
@settings(max_examples=300, deadline=None, database=None)
def test_parse_of_any_bytes_is_total(raw: bytes) -> None:
    for key in (raw, K.root + raw):
        parsed = K.parse(key)
        assert parsed is None or build(K, parsed) == key


segment_text = st.lists(
    st.sampled_from([*"ab%/0123456789ACF~ .é", "%2F", "%25", "%C3%A9", "%2f", "%41"]),
    max_size=16,
).map("".join)
kinds = st.sampled_from(["tasks/", "outcomes/", "runs/", "progress/", "members/", ""])


@given(kinds, segment_text)
@settings(max_examples=250, deadline=None, database=None)
def test_parse_is_exact_inverse_of_build(kind: str, tail: str) -> None:
    """Whatever parses is a key we would build, byte for byte: no two keys name one thing."""
    key = K.root + kind.encode() + tail.encode()
    parsed = K.parse(key)
    if parsed is not None:
        assert build(K, parsed) == key


# ---- prefix_range_end -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"a", b"b"),
        (b"a\xff", b"b"),
        (b"a\xff\xff", b"b"),
        (b"ab", b"ac"),
        (b"a\xfe", b"a\xff"),
        (b"/dt/", b"/dt0"),
        (b"\x00", b"\x01"),
        (b"\xff", b"\x00"),
        (b"\xff\xff", b"\x00"),
        (b"", b"\x00"),
    ],
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


@given(st.binary(min_size=1, max_size=6), st.binary(max_size=8))
@settings(max_examples=200, deadline=None, database=None)
def test_prefix_range_is_exactly_the_keys_under_prefix(prefix: bytes, key: bytes) -> None:
    end = prefix_range_end(prefix)
    if end == b"\x00":  # etcd: from prefix to the end of the keyspace
        assert prefix.strip(b"\xff") == b""
        covered = key >= prefix
    else:
        covered = prefix <= key < end
    assert covered == key.startswith(prefix)
    assert prefix <= prefix + key
    if end != b"\x00":
        assert prefix + key < end


def test_prefix_range_end_does_not_mutate() -> None:
    prefix = b"a\xff"
    prefix_range_end(prefix)
    assert prefix == b"a\xff"
