"""Unit tests of the public surface (spec/API.md): the names ``distributedtask`` exports, the
error tree and its messages, and EtcdClient's argument checks. No etcd, no network."""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest

import distributedtask as dt
from distributedtask import exceptions
from distributedtask.exceptions import (
    CorruptRecordError,
    DistributedTaskError,
    EtcdError,
    InvalidTaskError,
    NoEligibleNodesError,
    StorageFormatError,
    TaskAlreadyRunningError,
    TaskNotFoundError,
    TaskNotRunningError,
    TaskStillRunningError,
    TaskTooFreshError,
    UnitClaimError,
)

# Every public name of API.md; the ones not implemented yet are added by later work.
API_NAMES = {
    "DistributedTaskError",
    "EtcdClient",
    "EtcdError",
    "InvalidTaskError",
    "Manager",
    "NoEligibleNodesError",
    "Progress",
    "Task",
    "TaskAlreadyRunningError",
    "TaskDescriptor",
    "TaskNotFoundError",
    "TaskNotRunningError",
    "TaskStatus",
    "TaskStillRunningError",
    "TaskTooFreshError",
}
LATER_API_NAMES = {"Scheduler", "Provider", "TaskHandle", "TaskCompletionRecorder"}
# Errors of the tree that distributedtask.exceptions exports; the top level may re-export them.
STORAGE_ERRORS = [CorruptRecordError, StorageFormatError]

ERRORS = [
    TaskNotFoundError,
    TaskAlreadyRunningError,
    TaskNotRunningError,
    TaskStillRunningError,
    TaskTooFreshError,
    InvalidTaskError,
    UnitClaimError,
    NoEligibleNodesError,
    EtcdError,
]
TREE = [*ERRORS, *STORAGE_ERRORS]

PASSWORD = "s3cr3t-pa55w0rd"


# ---- exports ----------------------------------------------------------------------------------


def test_all_is_sorted_and_unique() -> None:
    assert list(dt.__all__) == sorted(dt.__all__)
    assert len(set(dt.__all__)) == len(dt.__all__)


def test_every_name_in_all_is_importable() -> None:
    module = importlib.import_module("distributedtask")
    for name in dt.__all__:
        assert getattr(module, name) is not None, name
    namespace: dict[str, Any] = {}
    exec("from distributedtask import *", namespace)
    assert set(dt.__all__) <= set(namespace)


def test_all_contains_the_api_names() -> None:
    # a subset check: Scheduler, Provider, ... join __all__ as they are implemented
    assert set(dt.__all__) >= API_NAMES
    assert all(name.isidentifier() and not name.startswith("_") for name in dt.__all__)


@pytest.mark.parametrize("name", sorted(LATER_API_NAMES))
def test_later_api_names_are_exported_once_implemented(name: str) -> None:
    if hasattr(dt, name):
        assert name in dt.__all__


def test_exported_names_are_the_defining_objects() -> None:
    from distributedtask import exceptions, model
    from distributedtask.etcd.client import EtcdClient

    assert dt.EtcdClient is EtcdClient
    for name in ("Task", "TaskDescriptor", "TaskStatus", "Progress"):
        assert getattr(dt, name) is getattr(model, name)
    for error in ERRORS:
        assert getattr(dt, error.__name__) is getattr(exceptions, error.__name__)
    assert dt.DistributedTaskError is exceptions.DistributedTaskError


@pytest.mark.parametrize("error", STORAGE_ERRORS, ids=lambda e: e.__name__)
def test_storage_errors_exported_at_the_top_are_the_defining_objects(
    error: type[Exception],
) -> None:
    name = error.__name__
    if hasattr(dt, name):
        assert name in dt.__all__
        assert getattr(dt, name) is error


def test_exceptions_module_exports_the_whole_error_tree() -> None:
    assert list(exceptions.__all__) == sorted(exceptions.__all__)
    assert set(exceptions.__all__) == {e.__name__ for e in TREE} | {"DistributedTaskError"}
    for name in exceptions.__all__:
        assert getattr(exceptions, name).__module__ == exceptions.__name__


def test_version_is_a_string() -> None:
    assert isinstance(dt.__version__, str)
    assert dt.__version__


# ---- the error tree ---------------------------------------------------------------------------


@pytest.mark.parametrize("error", TREE, ids=lambda e: e.__name__)
def test_every_error_derives_from_the_root(error: type[Exception]) -> None:
    assert issubclass(error, DistributedTaskError)
    assert issubclass(error, Exception)


def test_root_is_an_exception() -> None:
    assert issubclass(DistributedTaskError, Exception)
    assert not issubclass(DistributedTaskError, ValueError)


def test_invalid_task_error_is_also_a_value_error() -> None:
    assert issubclass(InvalidTaskError, ValueError)
    error = InvalidTaskError("bad namespace", "namespace")
    assert error.field == "namespace"
    assert str(error) == "bad namespace"
    with pytest.raises(ValueError):
        raise error


@pytest.mark.parametrize("error", [e for e in TREE if not issubclass(e, InvalidTaskError)])
def test_other_errors_are_not_value_errors(error: type[Exception]) -> None:
    assert not issubclass(error, ValueError)


def test_errors_are_distinct_siblings() -> None:
    children = {UnitClaimError: InvalidTaskError}  # the one child, as the tree's drawing shows
    for a in TREE:
        for b in TREE:
            if a is not b and children.get(a) is not b:
                assert not issubclass(a, b), (a, b)
    assert issubclass(UnitClaimError, InvalidTaskError)


def test_unit_claim_error_names_the_unit_the_caller_and_the_holder() -> None:
    error = UnitClaimError("u1", "n2", "n1")
    assert (error.unit_id, error.node_id, error.holder, error.field) == (
        "u1",
        "n2",
        "n1",
        "unit_id",
    )
    assert "u1" in str(error) and "n1" in str(error) and "n2" in str(error)


# ---- messages and fields ----------------------------------------------------------------------


def test_task_not_found_error() -> None:
    error = TaskNotFoundError("ns", "id", 3)
    assert "does not exist" in str(error)
    assert "ns" in str(error)
    assert "id" in str(error)
    assert (error.namespace, error.task_id, error.version) == ("ns", "id", 3)
    without_version = TaskNotFoundError("ns", "id")
    assert "does not exist" in str(without_version)
    assert without_version.version is None


def test_task_already_running_error() -> None:
    error = TaskAlreadyRunningError("ns", "id", 17)
    assert "already running with version 17" in str(error)
    assert (error.namespace, error.task_id, error.version) == ("ns", "id", 17)


def test_task_not_running_error() -> None:
    error = TaskNotRunningError("ns", "id", 5, "FINISHED")
    assert "no longer running" in str(error)
    assert (error.namespace, error.task_id, error.version) == ("ns", "id", 5)
    assert error.status == "FINISHED"


def test_task_still_running_error() -> None:
    error = TaskStillRunningError("ns", "id", 5)
    assert "still running" in str(error)
    assert (error.namespace, error.task_id, error.version) == ("ns", "id", 5)


def test_task_too_fresh_error() -> None:
    error = TaskTooFreshError("ns", "id", 5, 432000.0)
    assert "too fresh to clean up" in str(error)
    assert (error.namespace, error.task_id, error.version) == ("ns", "id", 5)
    assert error.ttl_seconds == 432000.0


def test_no_eligible_nodes_error() -> None:
    error = NoEligibleNodesError("ns")
    assert error.namespace == "ns"
    assert "ns" in str(error)


def test_corrupt_record_error() -> None:
    error = CorruptRecordError("task record is not valid JSON", key=b"/dt/cluster/tasks/a/b")
    assert error.key == b"/dt/cluster/tasks/a/b"
    assert str(error).startswith("task record is not valid JSON")
    assert CorruptRecordError("bad").key is None


@pytest.mark.parametrize(("found", "what"), [(1, "0.1"), (3, "storage layout 3")])
def test_storage_format_error(found: int, what: str) -> None:
    error = StorageFormatError("/dt", found, 2)
    assert (error.prefix, error.found, error.expected) == ("/dt", found, 2)
    assert what in str(error)
    assert "'/dt'" in str(error)
    assert "layout 2" in str(error)
    assert "does not migrate" in str(error)


def test_etcd_error_fields() -> None:
    error = EtcdError(
        "request failed",
        endpoint="http://e:2379",
        code=14,
        etcd_message="etcdserver: no leader",
        transient=True,
    )
    assert "request failed" in str(error)
    assert "http://e:2379" in str(error)
    assert (error.endpoint, error.code, error.etcd_message, error.transient) == (
        "http://e:2379",
        14,
        "etcdserver: no leader",
        True,
    )
    plain = EtcdError("down")
    assert str(plain) == "down"
    assert (plain.endpoint, plain.code, plain.etcd_message, plain.transient) == (
        None,
        None,
        None,
        False,
    )


@pytest.mark.parametrize(
    "error",
    [
        TaskNotFoundError("a/b", "c", 1),
        TaskAlreadyRunningError("a/b", "c", 1),
        TaskNotRunningError("a/b", "c", 1, "FAILED"),
        TaskStillRunningError("a/b", "c", 1),
        TaskTooFreshError("a/b", "c", 1, 1.0),
    ],
)
def test_task_errors_can_be_caught_as_the_root(error: DistributedTaskError) -> None:
    with pytest.raises(DistributedTaskError):
        raise error


# ---- EtcdClient -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoints",
    [
        [],
        (),
        "",
        " ",
        ",",
        " , ",
        "ftp://x",
        ["ftp://x:2379"],
        "unix:///tmp/etcd.sock",
        "http://",
        "http://host:2379/v3",
        "http://host:2379?x=1",
        "http://host:notaport",
        "http://host:99999",
        ["http://ok:2379", "ftp://bad"],
    ],
)
def test_etcd_client_rejects_bad_endpoints(endpoints: Any) -> None:
    with pytest.raises(ValueError):
        dt.EtcdClient(endpoints)


@pytest.mark.parametrize("timeout", [None, 0, 0.0, -1, math.inf, -math.inf, math.nan, "5"])
def test_etcd_client_rejects_bad_timeouts(timeout: Any) -> None:
    with pytest.raises(ValueError):
        dt.EtcdClient("http://127.0.0.1:2379", timeout=timeout)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"username": "root"},
        {"password": PASSWORD},
        {"username": "root", "password": None},
        {"key": "client.key"},  # a key needs its certificate
    ],
)
def test_etcd_client_rejects_incomplete_credentials(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dt.EtcdClient("http://127.0.0.1:2379", **kwargs)


def test_etcd_client_error_on_password_alone_does_not_leak_it() -> None:
    with pytest.raises(ValueError) as info:
        dt.EtcdClient("http://127.0.0.1:2379", password=PASSWORD)
    assert PASSWORD not in str(info.value)


def test_etcd_client_accepts_good_arguments_without_network() -> None:
    with dt.EtcdClient("http://127.0.0.1:1", timeout=0.5) as client:
        assert client.endpoints == ["http://127.0.0.1:1"]
        assert client.timeout == 0.5
        assert not client.closed
    assert client.closed


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ("http://a:2379", ["http://a:2379"]),
        ("a:1234", ["http://a:1234"]),
        ("http://a", ["http://a:2379"]),
        ("https://a:2379/", ["https://a:2379"]),
        ("http://a:1,http://b:2", ["http://a:1", "http://b:2"]),
        (["http://a:1", "https://b:2"], ["http://a:1", "https://b:2"]),
        (("http://a:1",), ["http://a:1"]),
    ],
)
def test_etcd_client_endpoints(endpoints: Any, expected: list[str]) -> None:
    client = dt.EtcdClient(endpoints)
    try:
        assert client.endpoints == expected
    finally:
        client.close()


def test_etcd_client_default_timeout_is_finite() -> None:
    client = dt.EtcdClient()
    try:
        assert client.timeout == 5.0
        assert client.endpoints == ["http://127.0.0.1:2379"]
    finally:
        client.close()


def test_etcd_client_close_is_idempotent() -> None:
    client = dt.EtcdClient("http://127.0.0.1:2379")
    client.close()
    client.close()
    assert client.closed


def test_etcd_client_repr_never_contains_the_password() -> None:
    client = dt.EtcdClient(
        ["http://127.0.0.1:2379", "http://127.0.0.2:2379"],
        username="root",
        password=PASSWORD,
    )
    try:
        text = repr(client)
        assert PASSWORD not in text
        assert PASSWORD not in str(client)
        assert "root" in text
        assert "127.0.0.1:2379" in text
    finally:
        client.close()
    assert PASSWORD not in repr(client)


def test_etcd_client_repr_without_auth() -> None:
    client = dt.EtcdClient("http://127.0.0.1:2379")
    try:
        assert "EtcdClient" in repr(client)
        assert "username" not in repr(client)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((["http://a:2379", 5],), {}),
        ((b"http://a:2379",), {}),
        (("http://a:2379",), {"watch_timeout": None}),
        (("http://a:2379",), {"timeout": True}),
    ],
    ids=["int-endpoint", "bytes-endpoints", "watch-timeout-none", "timeout-true"],
)
def test_etcd_client_rejects_malformed_types_with_value_error(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        dt.EtcdClient(*args, **kwargs).close()
