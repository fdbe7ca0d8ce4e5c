"""Unit tests of the key schema of layout 2 (src/distributedtask/keys.py): building, exact and
total parsing of every kind of key (the units' among them: declarations, claims, the other keys
under ``P/units/run/``, the pool and group marks, group segments), escaping, assignment
buckets, reserved prefix segments, prefix isolation and etcd range ends. Pure; no etcd."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tests.layout import (
    KINDS,
    MAX_VERSION,
    ParsedKey,
    buckets,
    built,
    check_parse,
    in_range,
    names,
    one_of_each,
    range_of,
    range_roots,
    rebuild,
    versions,
)

from distributedtask import keys as keys_module
from distributedtask.keys import (
    BUCKETS,
    AssignKey,
    DoneKey,
    GroupKey,
    Keys,
    MemberKey,
    NodesKey,
    OutcomeKey,
    PoolKey,
    ProgressKey,
    TaskKey,
    UnitClaimKey,
    UnitDeclKey,
    UnitRunKey,
    bucket_of,
    prefix_range_end,
)

K = Keys("/dt")
PROPERTY = settings(max_examples=200, deadline=None, database=None)

RESERVED = ["format", "cluster", "assign", "nodes", "done", "attempts", "progress", "units"]
LEGACY = ["tasks", "outcomes", "runs", "members"]  # the top-level names of the 0.1 layout


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
        assert built(keys) == built(a)
        assert keys.format == a.format
        assert keys.parse(a.task("ns", "id")) == TaskKey("ns", "id")


def test_repr() -> None:
    assert repr(Keys("/p/")) == "Keys('/p')"


def test_key_layout() -> None:
    assert K.format == b"/dt/format"
    assert K.cluster == b"/dt/cluster/"
    assert K.task("ns", "id") == b"/dt/cluster/tasks/ns/id"
    assert K.outcome("ns", "id") == b"/dt/cluster/outcomes/ns/id"
    assert K.member("node") == b"/dt/cluster/members/node"
    assert K.nodes("ns", "id") == b"/dt/nodes/ns/id"
    assert K.bucket(0) == b"/dt/assign/00/"
    assert K.bucket(10) == b"/dt/assign/0a/"
    assert K.bucket(BUCKETS - 1) == b"/dt/assign/3f/"
    assert K.assign(5, "ns", "id") == b"/dt/assign/05/ns/id"
    assert K.task_done("ns", "id") == b"/dt/done/ns/id/"
    assert K.done("ns", "id", "node") == b"/dt/done/ns/id/node"
    assert K.task_progress("ns", "id") == b"/dt/progress/ns/id/"
    assert K.version_progress("ns", "id", 7) == b"/dt/progress/ns/id/7/"
    assert K.progress("ns", "id", 7, "node") == b"/dt/progress/ns/id/7/node"


def test_unit_key_layout() -> None:
    assert K.unit_decl("ns", "id") == b"/dt/units/decl/ns/id"
    assert K.unit_run("ns", "id") == b"/dt/units/run/ns/id/"
    assert K.unit_claims("ns", "id") == b"/dt/units/run/ns/id/claim/"
    assert K.unit_claim("ns", "id", "u") == b"/dt/units/run/ns/id/claim/u"
    assert K.unit_ticket("ns", "id") == b"/dt/units/run/ns/id/ticket"
    assert K.unit_node_ticket("ns", "id", "n") == b"/dt/units/run/ns/id/aticket/n"
    assert K.units_held("ns", "id", "n") == b"/dt/units/run/ns/id/held/n/"
    assert K.unit_held("ns", "id", "n", "u") == b"/dt/units/run/ns/id/held/n/u"
    assert K.units_completed("ns", "id") == b"/dt/units/run/ns/id/count"
    assert K.group_counts("ns", "id") == b"/dt/units/run/ns/id/gcount/"
    assert K.group_count("ns", "id", "g") == b"/dt/units/run/ns/id/gcount/=g"
    assert K.group_count("ns", "id", "") == b"/dt/units/run/ns/id/gcount/="
    assert K.unit_progresses("ns", "id") == b"/dt/units/run/ns/id/progress/"
    assert K.unit_progress("ns", "id", "u") == b"/dt/units/run/ns/id/progress/u"
    assert K.group_acks("ns", "id", "n") == b"/dt/units/run/ns/id/acks/n/"
    assert K.group_ack("ns", "id", "n", "g") == b"/dt/units/run/ns/id/acks/n/=g"
    assert K.task_pool("ns", "id") == b"/dt/cluster/pool/ns/id/"
    assert K.pool("ns", "id", "u") == b"/dt/cluster/pool/ns/id/u"
    assert K.task_groups("ns", "id") == b"/dt/cluster/groups/ns/id/"
    assert K.group("ns", "id", "g") == b"/dt/cluster/groups/ns/id/=g"
    assert K.group("ns", "id", "") == b"/dt/cluster/groups/ns/id/="


def test_range_roots_layout() -> None:
    assert K.all_tasks() == b"/dt/cluster/tasks/"
    assert K.all_outcomes() == b"/dt/cluster/outcomes/"
    assert K.all_members() == b"/dt/cluster/members/"
    assert K.all_nodes() == b"/dt/nodes/"
    assert K.all_assignments() == b"/dt/assign/"
    assert K.all_done() == b"/dt/done/"
    assert K.all_progress() == b"/dt/progress/"
    assert K.all_unit_decls() == b"/dt/units/decl/"
    assert K.all_unit_runs() == b"/dt/units/run/"
    assert K.all_pool() == b"/dt/cluster/pool/"
    assert K.all_groups() == b"/dt/cluster/groups/"
    assert K.legacy == (b"/dt/members/", b"/dt/outcomes/", b"/dt/runs/", b"/dt/tasks/")
    # every range ends in "/", so no root is a prefix of a longer name
    for root in range_roots(K).values():
        assert root.endswith(b"/"), root


def test_builders_return_bytes_under_the_root() -> None:
    others = [K.task_done("a", "b"), K.task_progress("a", "b"), K.version_progress("a", "b", 1)]
    for key in [*built(K).values(), *others, K.bucket(3), K.format]:
        assert isinstance(key, bytes)
        assert key.startswith(K.root)


def test_names_are_percent_encoded() -> None:
    assert K.task("a/b", "c d") == b"/dt/cluster/tasks/a%2Fb/c%20d"
    assert K.assign(1, "a/b", "c d") == b"/dt/assign/01/a%2Fb/c%20d"
    assert K.done("n", "i", "a/b") == b"/dt/done/n/i/a%2Fb"
    assert K.member("100%") == b"/dt/cluster/members/100%25"
    assert K.member("é") == b"/dt/cluster/members/%C3%A9"
    assert K.member("a-b_c.d~e") == b"/dt/cluster/members/a-b_c.d~e"


def test_non_ascii_prefix() -> None:
    keys = Keys("/日本/dt")
    key = keys.task("ns", "id")
    assert key == "/日本/dt/cluster/tasks/ns/id".encode()
    assert keys.parse(key) == TaskKey("ns", "id")


def test_prefix_without_leading_slash() -> None:
    keys = Keys("dt")
    assert keys.task("a", "b") == b"dt/cluster/tasks/a/b"
    assert keys.parse(b"dt/cluster/tasks/a/b") == TaskKey("a", "b")
    assert K.parse(b"dt/cluster/tasks/a/b") is None
    assert keys.parse(b"/dt/cluster/tasks/a/b") is None


def test_module_exports_the_layout_2_names() -> None:
    new = {"BUCKETS", "AssignKey", "DoneKey", "NodesKey", "bucket_of"}
    new |= {"UnitDeclKey", "UnitClaimKey", "UnitRunKey", "PoolKey", "GroupKey"}
    assert new <= set(keys_module.__all__)
    assert all(hasattr(keys_module, name) for name in keys_module.__all__)
    assert not hasattr(keys_module, "RunKey")  # layout 1's per-node run keys are gone
    assert BUCKETS == 64


# ---- reserved segments ------------------------------------------------------------------------


def test_reserved_segments_are_the_layout_names_and_the_0_1_names() -> None:
    assert set(RESERVED) == keys_module.LAYOUT_SEGMENTS
    assert set(LEGACY) == keys_module.LEGACY_SEGMENTS
    assert set(RESERVED) | set(LEGACY) == keys_module.RESERVED_SEGMENTS


@pytest.mark.parametrize("segment", RESERVED + LEGACY)
@pytest.mark.parametrize("shape", ["/{}", "{}", "/dt/{}", "/dt/{}/", "/{}/x", "/a/{}/b/c"])
def test_a_prefix_with_a_reserved_segment_is_refused(segment: str, shape: str) -> None:
    with pytest.raises(ValueError, match="reserved segment"):
        Keys(shape.format(segment))


@pytest.mark.parametrize(
    "prefix",
    ["/dt/Cluster", "/dt/formats", "/dt/task", "/dt/run", "/dt/unit", "/dt/x-done", "/clusterx"],
)
def test_a_prefix_that_only_resembles_a_reserved_segment_is_accepted(prefix: str) -> None:
    assert Keys(prefix).prefix == prefix


def test_parse_rejects_keys_of_a_nested_prefix() -> None:
    for other in (Keys("/dt/x"), Keys("/dt/done-x"), Keys("/dt/clusterx"), Keys("/dt/assign2")):
        for key in built(other).values():
            assert K.parse(key) is None, (other, key)


def test_parse_rejects_keys_of_other_prefixes() -> None:
    for other in (Keys("/other"), Keys("/dtx"), Keys("/d"), Keys("dt"), Keys("/x/dt")):
        for key in built(other).values():
            assert K.parse(key) is None, (other, key)
            assert not in_range(key, K.root)


# ---- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        (b"/dt/cluster/tasks/ns/id", TaskKey("ns", "id")),
        (b"/dt/cluster/outcomes/ns/id", OutcomeKey("ns", "id")),
        (b"/dt/cluster/members/node", MemberKey("node")),
        (b"/dt/nodes/ns/id", NodesKey("ns", "id")),
        (b"/dt/assign/00/ns/id", AssignKey(0, "ns", "id")),
        (b"/dt/assign/0a/ns/id", AssignKey(10, "ns", "id")),
        (b"/dt/assign/3f/ns/id", AssignKey(63, "ns", "id")),
        (b"/dt/done/ns/id/node", DoneKey("ns", "id", "node")),
        (b"/dt/progress/ns/id/12/node", ProgressKey("ns", "id", 12, "node")),
        (b"/dt/cluster/tasks/a%2Fb/c", TaskKey("a/b", "c")),
        (b"/dt/cluster/tasks/a/b%2Fc", TaskKey("a", "b/c")),
        (b"/dt/cluster/members/%25", MemberKey("%")),
        # names that are also segment names of the schema are just names
        (b"/dt/cluster/tasks/cluster/tasks", TaskKey("cluster", "tasks")),
        (b"/dt/done/done/assign/00", DoneKey("done", "assign", "00")),
        (b"/dt/assign/00/00/3f", AssignKey(0, "00", "3f")),
        # units
        (b"/dt/units/decl/ns/id", UnitDeclKey("ns", "id")),
        (b"/dt/units/run/ns/id/claim/u", UnitClaimKey("ns", "id", "u")),
        (b"/dt/units/run/ns/id/ticket", UnitRunKey("ns", "id", "ticket", ())),
        (b"/dt/units/run/ns/id/aticket/n", UnitRunKey("ns", "id", "aticket", ("n",))),
        (b"/dt/units/run/ns/id/held/n/u", UnitRunKey("ns", "id", "held", ("n", "u"))),
        (b"/dt/units/run/ns/id/count", UnitRunKey("ns", "id", "count", ())),
        (b"/dt/units/run/ns/id/gcount/=g", UnitRunKey("ns", "id", "gcount", ("g",))),
        (b"/dt/units/run/ns/id/gcount/=", UnitRunKey("ns", "id", "gcount", ("",))),
        (b"/dt/units/run/ns/id/progress/u", UnitRunKey("ns", "id", "progress", ("u",))),
        (b"/dt/units/run/ns/id/acks/n/=g", UnitRunKey("ns", "id", "acks", ("n", "g"))),
        (b"/dt/units/run/ns/id/acks/n/=", UnitRunKey("ns", "id", "acks", ("n", ""))),
        (b"/dt/cluster/pool/ns/id/u", PoolKey("ns", "id", "u")),
        (b"/dt/cluster/groups/ns/id/=g", GroupKey("ns", "id", "g")),
        (b"/dt/cluster/groups/ns/id/=", GroupKey("ns", "id", "")),
        (b"/dt/cluster/groups/ns/id/=%3D", GroupKey("ns", "id", "=")),
        (b"/dt/cluster/groups/ns/id/=%3D%3D", GroupKey("ns", "id", "==")),
        (b"/dt/cluster/groups/ns/id/=%2F", GroupKey("ns", "id", "/")),
        (b"/dt/cluster/groups/ns/id/=a%3Db%2Fc", GroupKey("ns", "id", "a=b/c")),
        # a unit, node or group named like a kind of key is just a name
        (b"/dt/units/run/claim/ticket/claim/count", UnitClaimKey("claim", "ticket", "count")),
        (b"/dt/units/run/ns/id/held/held/claim", UnitRunKey("ns", "id", "held", ("held", "claim"))),
        (b"/dt/units/run/ns/id/gcount/=gcount", UnitRunKey("ns", "id", "gcount", ("gcount",))),
        (b"/dt/cluster/pool/pool/groups/tasks", PoolKey("pool", "groups", "tasks")),
        (b"/dt/units/decl/units/run", UnitDeclKey("units", "run")),
    ],
)
def test_parse(key: bytes, parsed: ParsedKey) -> None:
    assert K.parse(key) == parsed
    assert rebuild(K, parsed) == key


@pytest.mark.parametrize("bucket", range(BUCKETS))
def test_every_bucket_round_trips(bucket: int) -> None:
    key = K.assign(bucket, "ns", "id")
    assert key == b"/dt/assign/%02x/ns/id" % bucket
    assert K.parse(key) == AssignKey(bucket, "ns", "id")
    assert in_range(key, K.bucket(bucket))


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
        ("00", "3f", "40"),
        ("x" * 256, "é" * 128, "🎉" * 64),
    ],
)
def test_awkward_names_round_trip(namespace: str, task_id: str, node_id: str) -> None:
    expected = one_of_each(namespace, task_id, node_id, version=3)
    for kind, key in built(K, namespace, task_id, node_id, version=3).items():
        assert K.parse(key) == expected[kind], kind


def test_slash_in_names_cannot_forge_another_key() -> None:
    assert K.task("a/b", "c") != K.task("a", "b/c")
    assert K.outcome("a/b", "c") != K.outcome("a", "b/c")
    assert K.nodes("a/b", "c") != K.nodes("a", "b/c")
    assert K.assign(1, "a/b", "c") != K.assign(1, "a", "b/c")
    assert K.done("a/b", "c", "d") != K.done("a", "b/c", "d")
    assert K.done("a", "b/c", "d") != K.done("a", "b", "c/d")
    assert K.progress("a", "b", 1, "c") != K.progress("a", "b/1", 1, "c")
    assert K.parse(K.task("a/b", "c")) == TaskKey("a/b", "c")
    assert K.parse(K.task("a", "b/c")) == TaskKey("a", "b/c")
    assert K.parse(K.done("a", "b", "c/d")) == DoneKey("a", "b", "c/d")
    assert K.parse(K.member("tasks/a/b")) == MemberKey("tasks/a/b")
    assert K.parse(K.assign(0, "01/a", "b")) == AssignKey(0, "01/a", "b")
    # the completions of (a/b, c) never fall in the range of (a, b) or vice versa
    assert not in_range(K.done("a/b", "c", "d"), K.task_done("a", "b"))
    assert not in_range(K.done("a", "b/c", "d"), K.task_done("a", "b"))
    assert not in_range(K.progress("a", "b/c", 1, "d"), K.task_progress("a", "b"))
    # a namespace cannot reach into the assignments of another bucket
    assert not in_range(K.assign(0, "01/a", "b"), K.bucket(1))


def test_task_id_prefix_never_covers_a_longer_id() -> None:
    assert not K.task_done("ns", "ab").startswith(K.task_done("ns", "a"))
    assert not in_range(K.done("ns", "ab", "node"), K.task_done("ns", "a"))
    assert in_range(K.done("ns", "a", "node"), K.task_done("ns", "a"))
    assert not in_range(K.done("nsx", "a", "node"), K.task_done("ns", "a"))
    assert not in_range(K.progress("ns", "ab", 1, "n"), K.task_progress("ns", "a"))
    # version 1 never covers version 10
    assert not in_range(K.progress("ns", "a", 10, "n"), K.version_progress("ns", "a", 1))
    assert in_range(K.progress("ns", "a", 1, "n"), K.version_progress("ns", "a", 1))
    assert in_range(K.version_progress("ns", "a", 1), K.task_progress("ns", "a"))


def test_kinds_never_share_a_range() -> None:
    roots = range_roots(K)
    samples = built(K)
    for name, root in roots.items():
        for kind, key in samples.items():
            if name == "cluster":
                # what every Scheduler watches: records, outcomes, run states, members, the
                # pool and group marks; nothing per node, and no unit transition but those
                expected = kind in ("task", "outcome", "state", "member", "pool", "group")
            elif name.startswith("bucket "):
                expected = name == f"bucket {bucket_of('c')}" and kind == "assign"
            else:
                expected = name == range_of(kind)
            assert in_range(key, root) == expected, (name, kind)
            assert in_range(key, K.root)
            assert key != K.format


# Keys that are not ours although they lie under the prefix: other shapes, 0.1's layout, ...
FOREIGN_KEYS = [
    b"",
    b"/",
    b"/dt",
    b"/dt/",
    b"/dtx/cluster/tasks/a/b",
    b"/d/cluster/tasks/a/b",
    b"dt/cluster/tasks/a/b",
    b"/DT/cluster/tasks/a/b",
    b"/dt/unknown/a/b",
    b"/dt/format",
    b"/dt/format/a/b",
    b"/dt/units/a/b",
    # the keys of layout 1 (0.1) are foreign to layout 2
    b"/dt/tasks/a/b",
    b"/dt/outcomes/a/b",
    b"/dt/runs/a/b/c",
    b"/dt/members/c",
    b"/dt/task/a/b",
    b"/dt/Cluster/tasks/a/b",
    b"/dt//cluster/tasks/a/b",
    b"/dt/cluster",
    b"/dt/cluster/",
    b"/dt/cluster/unknown/a/b",
    b"/dt/cluster/nodes/a/b",
    b"/dt/cluster/done/a/b/c",
    b"/dt/cluster/Tasks/a/b",
    b"/dt/cluster/tasks",
    b"/dt/cluster/tasks/",
    b"/dt/cluster/tasks/a",
    b"/dt/cluster/tasks/a/",
    b"/dt/cluster/tasks//b",
    b"/dt/cluster/tasks/a/b/",
    b"/dt/cluster/tasks/a/b/c",
    b"/dt/cluster/outcomes/a",
    b"/dt/cluster/outcomes/a/b/c",
    b"/dt/cluster/members",
    b"/dt/cluster/members/",
    b"/dt/cluster/members/a/b",
    b"/dt/nodes",
    b"/dt/nodes/a",
    b"/dt/nodes/a/",
    b"/dt/nodes/a/b/",
    b"/dt/nodes/a/b/c",
    b"/dt/assign",
    b"/dt/assign/00",
    b"/dt/assign/00/",
    b"/dt/assign/00/a",
    b"/dt/assign/00/a/",
    b"/dt/assign/00//b",
    b"/dt/assign//a/b",
    b"/dt/assign/00/a/b/",
    b"/dt/assign/00/a/b/c",
    b"/dt/assign/a/b",
    b"/dt/assign/zz/a/b",
    b"/dt/assign/40/a/b",  # 64: out of range
    b"/dt/assign/ff/a/b",
    b"/dt/assign/0/a/b",
    b"/dt/assign/000/a/b",
    b"/dt/assign/0A/a/b",  # the builder writes lowercase hex
    b"/dt/assign/3F/a/b",
    b"/dt/assign/-1/a/b",
    b"/dt/assign/+1/a/b",
    b"/dt/assign/ 1/a/b",
    b"/dt/assign/0x/a/b",
    b"/dt/assign/%30%30/a/b",
    b"/dt/done/a/b",
    b"/dt/done/a/b/",
    b"/dt/done/a//c",
    b"/dt/done//b/c",
    b"/dt/done/a/b/c/",
    b"/dt/done/a/b/c/d",
    b"/dt/progress/a/b/1",
    b"/dt/progress/a/b/1/",
    b"/dt/progress/a/b//n",
    b"/dt/progress/a/b/x/n",
    b"/dt/progress/a/b/0/n",
    b"/dt/progress/a/b/-1/n",
    b"/dt/progress/a/b/+1/n",
    b"/dt/progress/a/b/01/n",
    b"/dt/progress/a/b/1.0/n",
    b"/dt/progress/a/b/%31/n",
    b"/dt/progress/a/b/1/n/x",
    b"/dt/progress/a/b/9223372036854775808/n",  # beyond int64
    # units
    b"/dt/units",
    b"/dt/units/",
    b"/dt/units/decl",
    b"/dt/units/decl/",
    b"/dt/units/decl/a",
    b"/dt/units/decl/a/",
    b"/dt/units/decl/a/b/",
    b"/dt/units/decl/a/b/c",
    b"/dt/units/Decl/a/b",
    b"/dt/units/run",
    b"/dt/units/run/",
    b"/dt/units/run/a",
    b"/dt/units/run/a/b",
    b"/dt/units/run/a/b/",
    b"/dt/units/run/a/b/unknown",
    b"/dt/units/run/a/b/unknown/u",
    b"/dt/units/run/a/b/claim",
    b"/dt/units/run/a/b/claim/",
    b"/dt/units/run/a/b/claim/u/",
    b"/dt/units/run/a/b/claim/u/x",
    b"/dt/units/run/a/b/Claim/u",
    b"/dt/units/run/a/b/ticket/",
    b"/dt/units/run/a/b/ticket/x",
    b"/dt/units/run/a/b/aticket",
    b"/dt/units/run/a/b/aticket/",
    b"/dt/units/run/a/b/aticket/n/x",
    b"/dt/units/run/a/b/held/n",
    b"/dt/units/run/a/b/held/n/",
    b"/dt/units/run/a/b/held//u",
    b"/dt/units/run/a/b/held/n/u/x",
    b"/dt/units/run/a/b/count/",
    b"/dt/units/run/a/b/count/x",
    b"/dt/units/run/a/b/gcount",
    b"/dt/units/run/a/b/gcount/",
    b"/dt/units/run/a/b/gcount/g",  # a group segment starts with "="
    b"/dt/units/run/a/b/gcount/==",  # "=" escaped is %3D
    b"/dt/units/run/a/b/gcount/=g/x",
    b"/dt/units/run/a/b/progress/=u",  # a unit is not a group
    b"/dt/units/run/a/b/progress/u/x",
    b"/dt/units/run/a/b/acks/n",
    b"/dt/units/run/a/b/acks/n/g",
    b"/dt/units/run/a/b/acks/=n/=g",  # a node is not a group
    b"/dt/units/run/a/b/acks/n/=g/x",
    b"/dt/units/run//b/claim/u",
    b"/dt/units/run/a//claim/u",
    b"/dt/units/run/a/b/c/claim/u",  # a task id with a slash is escaped
    b"/dt/cluster/pool",
    b"/dt/cluster/pool/",
    b"/dt/cluster/pool/a",
    b"/dt/cluster/pool/a/b",
    b"/dt/cluster/pool/a/b/",
    b"/dt/cluster/pool/a/b/=u",
    b"/dt/cluster/pool/a/b/u/x",
    b"/dt/cluster/pool//b/u",
    b"/dt/cluster/groups",
    b"/dt/cluster/groups/",
    b"/dt/cluster/groups/a",
    b"/dt/cluster/groups/a/b",
    b"/dt/cluster/groups/a/b/",
    b"/dt/cluster/groups/a/b/g",
    b"/dt/cluster/groups/a/b/==",
    b"/dt/cluster/groups/a/b/=a=b",  # "=" inside a group is escaped too
    b"/dt/cluster/groups/a/b/=g/",
    b"/dt/cluster/groups/a/b/=g/x",
    b"/dt/cluster/groups/a/=b/=g",
    b"/dt/cluster/Groups/a/b/=g",
]


@pytest.mark.parametrize("key", FOREIGN_KEYS)
def test_parse_rejects_foreign_and_mis_shaped_keys(key: bytes) -> None:
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
        b"%00",  # a control character is not a valid name
        b"%0A",
        b"\xc3\xa9",  # raw UTF-8: quote would escape it
        b"\xff",  # raw non-UTF-8
        b"\x00",
        b"x" * 257,  # longer than a name may be
        b"",
    ],
)
def test_parse_rejects_non_canonical_or_bad_segments(segment: bytes) -> None:
    for key in (
        b"/dt/cluster/tasks/" + segment + b"/id",
        b"/dt/cluster/tasks/ns/" + segment,
        b"/dt/cluster/outcomes/" + segment + b"/id",
        b"/dt/cluster/outcomes/ns/" + segment,
        b"/dt/cluster/members/" + segment,
        b"/dt/nodes/" + segment + b"/id",
        b"/dt/nodes/ns/" + segment,
        b"/dt/assign/00/" + segment + b"/id",
        b"/dt/assign/3f/ns/" + segment,
        b"/dt/done/" + segment + b"/id/node",
        b"/dt/done/ns/" + segment + b"/node",
        b"/dt/done/ns/id/" + segment,
        b"/dt/progress/" + segment + b"/id/1/node",
        b"/dt/progress/ns/" + segment + b"/1/node",
        b"/dt/progress/ns/id/1/" + segment,
        b"/dt/units/decl/" + segment + b"/id",
        b"/dt/units/decl/ns/" + segment,
        b"/dt/units/run/" + segment + b"/id/claim/u",
        b"/dt/units/run/ns/" + segment + b"/claim/u",
        b"/dt/units/run/ns/id/claim/" + segment,
        b"/dt/units/run/ns/id/aticket/" + segment,
        b"/dt/units/run/ns/id/held/" + segment + b"/u",
        b"/dt/units/run/ns/id/held/n/" + segment,
        b"/dt/units/run/ns/id/progress/" + segment,
        b"/dt/units/run/ns/id/acks/" + segment + b"/=g",
        b"/dt/cluster/pool/" + segment + b"/id/u",
        b"/dt/cluster/pool/ns/" + segment + b"/u",
        b"/dt/cluster/pool/ns/id/" + segment,
        b"/dt/cluster/groups/" + segment + b"/id/=g",
        b"/dt/cluster/groups/ns/" + segment + b"/=g",
    ):
        assert K.parse(key) is None, key
    if segment:  # "=" alone is the group "": any other segment after "=" must be canonical
        for key in (
            b"/dt/cluster/groups/ns/id/=" + segment,
            b"/dt/units/run/ns/id/gcount/=" + segment,
            b"/dt/units/run/ns/id/acks/n/=" + segment,
        ):
            assert K.parse(key) is None, key


def test_canonical_escapes_parse() -> None:
    assert K.parse(b"/dt/cluster/members/%2F") == MemberKey("/")
    assert K.parse(b"/dt/cluster/members/%C3%A9") == MemberKey("é")
    assert K.parse(b"/dt/cluster/members/%20") == MemberKey(" ")
    assert K.parse(b"/dt/done/%2F/%25/%20") == DoneKey("/", "%", " ")
    assert K.parse(b"/dt/assign/07/%2F/%C3%A9") == AssignKey(7, "/", "é")


def test_parse_takes_versions_up_to_int64() -> None:
    assert K.parse(K.progress("ns", "t", MAX_VERSION, "n")) == ProgressKey(
        "ns", "t", MAX_VERSION, "n"
    )
    assert K.parse(K.progress("ns", "t", MAX_VERSION + 1, "n")) is None
    assert K.parse(K.root + b"progress/ns/t/" + b"1" * 5000 + b"/n") is None


# ---- units: claims, run keys, the pool and group marks --------------------------------------

HOSTILE = ["a/b", "/", "%", "%25", "%2F", "=", "==", "=a", "a=b", " ", "..", "ü", "🎉", "x" * 256]
GROUPS = ["", "g", "=", "==", "=g", "/", "a/b", "a=b/c", "%3D", "%", " ", "..", "🎉" * 64]


@pytest.mark.parametrize("group", GROUPS)
def test_group_segments_round_trip(group: str) -> None:
    for kind, key in built(K, "ns", "t", "n", unit="u", group=group).items():
        assert K.parse(key) == one_of_each("ns", "t", "n", unit="u", group=group)[kind], kind
    segment = K.group("ns", "t", group)[len(K.task_groups("ns", "t")) :]
    assert segment.startswith(b"=") and b"/" not in segment
    assert (segment == b"=") == (group == "")
    assert Keys.group_under(K.task_groups("ns", "t"), K.group("ns", "t", group)) == group
    acks = K.group_acks("ns", "t", "n")
    assert Keys.group_under(acks, K.group_ack("ns", "t", "n", group)) == group


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_unit_and_node_names_round_trip(name: str) -> None:
    for ns, tid, node, unit in [
        (name, "t", "n", "u"),
        ("ns", name, "n", "u"),
        ("ns", "t", name, name),
    ]:
        expected = one_of_each(ns, tid, node, unit=unit, group=unit)
        for kind, key in built(K, ns, tid, node, unit=unit, group=unit).items():
            assert K.parse(key) == expected[kind], (kind, key)
    assert Keys.name_under(K.unit_claims("ns", "t"), K.unit_claim("ns", "t", name)) == name
    assert (
        Keys.name_under(K.units_held("ns", "t", name), K.unit_held("ns", "t", name, name)) == name
    )
    assert Keys.name_under(K.task_pool("ns", "t"), K.pool("ns", "t", name)) == name


def test_the_group_named_empty_and_the_group_named_equals_are_distinct() -> None:
    assert K.group("ns", "t", "") != K.group("ns", "t", "=")
    assert K.group_count("ns", "t", "") != K.group_count("ns", "t", "=")
    assert K.parse(K.group("ns", "t", "")) == GroupKey("ns", "t", "")
    assert K.parse(K.group("ns", "t", "=")) == GroupKey("ns", "t", "=")
    assert K.parse(K.group_ack("ns", "t", "n", "")) == UnitRunKey("ns", "t", "acks", ("n", ""))


def test_unit_names_cannot_forge_other_unit_keys() -> None:
    # a slash in a unit, node or group name never reaches into another key or range
    assert K.unit_claim("ns", "t", "u/x") != K.unit_claim("ns", "t/u", "x")
    assert not in_range(K.unit_claim("ns", "t", "u/x"), K.unit_claims("ns", "t/u"))
    assert not in_range(K.unit_held("ns", "t", "n/u", "x"), K.units_held("ns", "t", "n"))
    assert not in_range(K.unit_held("ns", "t", "n", "u"), K.units_held("ns", "t", "n-2"))
    assert not in_range(K.unit_held("ns", "t", "nn", "u"), K.units_held("ns", "t", "n"))
    assert not in_range(K.group_ack("ns", "t", "n/=g", "g"), K.group_acks("ns", "t", "n"))
    assert not in_range(K.pool("ns", "t/x", "u"), K.task_pool("ns", "t"))
    assert not in_range(K.group("ns", "t/x", "g"), K.task_groups("ns", "t"))
    assert K.parse(K.group("ns", "t", "g/x")) == GroupKey("ns", "t", "g/x")
    # a unit named like a kind of key stays under claim/ (or progress/)
    for unit in ("ticket", "count", "held", "claim"):
        key = K.unit_claim("ns", "t", unit)
        assert K.parse(key) == UnitClaimKey("ns", "t", unit)
        assert in_range(key, K.unit_claims("ns", "t"))
        assert not in_range(K.unit_progress("ns", "t", unit), K.unit_claims("ns", "t"))
    # the ticket and count keys are not prefixes of the ranges next to them
    assert not in_range(K.unit_node_ticket("ns", "t", "n"), K.unit_ticket("ns", "t") + b"/")
    assert not in_range(K.unit_claim("ns", "t", "u"), K.unit_run("ns", "t") + b"count/")


def test_a_unit_run_range_never_covers_another_task() -> None:
    for key in built(K, "ns", "ab", "n").values():
        assert not in_range(key, K.unit_run("ns", "a"))
        assert not in_range(key, K.task_pool("ns", "a"))
        assert not in_range(key, K.task_groups("ns", "a"))
    assert in_range(K.unit_claim("ns", "a", "u"), K.unit_run("ns", "a"))
    assert in_range(K.unit_held("ns", "a", "n", "u"), K.unit_run("ns", "a"))
    assert in_range(K.group_ack("ns", "a", "n", ""), K.unit_run("ns", "a"))
    assert not in_range(K.unit_decl("ns", "a"), K.unit_run("ns", "a"))


@given(names, names, names, names, st.just("") | names)
@PROPERTY
def test_every_unit_key_round_trips(ns: str, tid: str, node: str, unit: str, group: str) -> None:
    expected = one_of_each(ns, tid, node, unit=unit, group=group)
    for kind, key in built(K, ns, tid, node, unit=unit, group=group).items():
        assert K.parse(key) == expected[kind], kind
        assert in_range(key, range_roots(K)[range_of(kind)]), kind
    assert in_range(K.unit_claim(ns, tid, unit), K.unit_claims(ns, tid))
    assert in_range(K.unit_held(ns, tid, node, unit), K.units_held(ns, tid, node))
    assert in_range(K.group_ack(ns, tid, node, group), K.group_acks(ns, tid, node))
    assert in_range(K.pool(ns, tid, unit), K.task_pool(ns, tid))
    assert in_range(K.group(ns, tid, group), K.task_groups(ns, tid))
    assert Keys.group_under(K.task_groups(ns, tid), K.group(ns, tid, group)) == group


@given(st.sampled_from(["cluster/groups/a/b/", "units/run/a/b/gcount/", "units/run/a/b/acks/n/"]))
@settings(max_examples=20, deadline=None, database=None)
def test_group_under_rejects_what_parse_rejects(where: str) -> None:
    prefix = K.root + where.encode()
    for segment in (b"g", b"==", b"=a=b", b"=%3d", b"=%zz", b"=\xff", b"=g/x", b"=%41"):
        assert Keys.group_under(prefix, prefix + segment) is None, segment
        assert K.parse(prefix + segment) is None, segment
    assert Keys.group_under(prefix, b"/elsewhere/=g") is None


# ---- buckets ----------------------------------------------------------------------------------


def crc32_reference(data: bytes) -> int:
    """CRC-32 (IEEE 802.3, reflected) written out bit by bit: what zlib.crc32 computes."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize(
    ("node", "bucket"),
    # zlib.crc32(node.encode()) % 64, computed once: the bucket of a node is part of the layout
    [
        ("node-1", 31),  # crc32 0x13f21c5f
        ("node-2", 37),  # crc32 0x8afb4de5
        ("a", 3),  # crc32 0xe8b7be43
        ("weaviate-0", 36),  # crc32 0x55092364
        ("ü", 21),  # crc32 0x63d969d5
        ("🎉", 55),  # crc32 0x6009b837
        ("x" * 256, 16),
    ],
)
def test_bucket_of_is_stable(node: str, bucket: int) -> None:
    assert bucket_of(node) == bucket
    assert crc32_reference(node.encode()) % BUCKETS == bucket


@given(st.text(max_size=40) | names)
@settings(max_examples=200, deadline=None, database=None)
def test_bucket_of_is_crc32_mod_buckets_and_in_range(node: str) -> None:
    bucket = bucket_of(node)
    assert type(bucket) is int
    assert 0 <= bucket < BUCKETS
    assert bucket == crc32_reference(node.encode("utf-8")) % BUCKETS
    assert bucket_of(node) == bucket


def test_buckets_spread_nodes() -> None:
    counts = [0] * BUCKETS
    for i in range(BUCKETS * 100):
        counts[bucket_of(f"node-{i}")] += 1
    assert min(counts) > 50  # roughly 100 each: no bucket is starved
    assert max(counts) < 150


# ---- properties -------------------------------------------------------------------------------


@given(names, names, names, versions, buckets)
@PROPERTY
def test_every_valid_name_round_trips(
    ns: str, tid: str, node: str, version: int, bucket: int
) -> None:
    expected = one_of_each(ns, tid, node, version, bucket)
    keys = built(K, ns, tid, node, version, bucket)
    assert set(keys) == set(KINDS)
    for kind, key in keys.items():
        assert K.parse(key) == expected[kind], kind
    assert in_range(keys["done"], K.task_done(ns, tid))
    assert in_range(keys["assign"], K.bucket(bucket))
    assert in_range(keys["progress"], K.version_progress(ns, tid, version))
    assert in_range(K.version_progress(ns, tid, version), K.task_progress(ns, tid))


@given(names, names, names, names)
@settings(max_examples=100, deadline=None, database=None)
def test_distinct_tasks_have_disjoint_keys_and_ranges(
    ns1: str, id1: str, ns2: str, id2: str
) -> None:
    assume((ns1, id1) != (ns2, id2))
    first, second = built(K, ns=ns1, tid=id1, node="n"), built(K, ns=ns2, tid=id2, node="n")
    for kind in KINDS:
        assert (first[kind] == second[kind]) == (kind == "member")
    assert not in_range(K.task_done(ns2, id2), K.task_done(ns1, id1))
    assert not in_range(second["done"], K.task_done(ns1, id1))
    assert not in_range(second["progress"], K.task_progress(ns1, id1))


@given(versions, versions)
@settings(max_examples=50, deadline=None, database=None)
def test_distinct_versions_have_disjoint_ranges(v1: int, v2: int) -> None:
    assume(v1 != v2)
    assert not in_range(K.progress("a", "b", v2, "n"), K.version_progress("a", "b", v1))


@given(buckets, buckets, names, names)
@settings(max_examples=50, deadline=None, database=None)
def test_distinct_buckets_have_disjoint_ranges(b1: int, b2: int, ns: str, tid: str) -> None:
    assume(b1 != b2)
    assert not in_range(K.assign(b2, ns, tid), K.bucket(b1))
    assert not in_range(K.bucket(b2), K.bucket(b1))


@given(st.binary(max_size=80))
@settings(max_examples=300, deadline=None, database=None)
def test_parse_of_any_bytes_is_total(raw: bytes) -> None:
    check_parse(K, raw)
    check_parse(K, K.root + raw)


segment_text = st.lists(
    st.sampled_from(
        [*"ab%/0123456789ACF~ .é=", "%2F", "%25", "%C3%A9", "%2f", "%41", "%3D", "3f", "40"]
    ),
    max_size=16,
).map("".join)
kinds = st.sampled_from(
    [
        "cluster/tasks/",
        "cluster/outcomes/",
        "cluster/members/",
        "cluster/",
        "nodes/",
        "assign/",
        "done/",
        "progress/",
        "format",
        "tasks/",
        "runs/",
        "units/decl/",
        "units/run/",
        "units/run/a/b/",
        "units/run/a/b/claim/",
        "units/run/a/b/held/",
        "units/run/a/b/gcount/",
        "units/run/a/b/gcount/=",
        "units/run/a/b/acks/n/=",
        "cluster/pool/",
        "cluster/groups/",
        "cluster/groups/a/b/=",
        "",
    ]
)


@given(kinds, segment_text)
@settings(max_examples=300, deadline=None, database=None)
def test_parse_is_exact_inverse_of_build(kind: str, tail: str) -> None:
    """Whatever parses is a key we would build, byte for byte: no two keys name one thing."""
    check_parse(K, K.root + kind.encode() + tail.encode())


@given(st.sampled_from(RESERVED + LEGACY), st.lists(st.sampled_from(["a", "b", ""]), max_size=3))
@settings(max_examples=50, deadline=None, database=None)
def test_any_prefix_with_a_reserved_segment_is_refused(segment: str, others: list[str]) -> None:
    parts = [*others, segment, *others]
    with pytest.raises(ValueError, match="reserved segment"):
        Keys("/" + "/".join(parts))


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
