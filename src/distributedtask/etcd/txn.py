"""Typed builders for etcd v3 compares and operations, and the parsed results of ranges and
transactions, in the JSON form of etcd's gRPC gateway (base64 keys/values, int64 as strings).

The rest of the library never sees gateway JSON: it builds requests with :func:`put`,
:func:`get`, :func:`mod_equals`... and reads :class:`TxnResult` / :class:`RangeResult`. Parsing
raises :class:`~distributedtask.exceptions.EtcdError` on a response of the wrong shape. Pure
values; thread-safe.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import EtcdError
from ..keys import prefix_range_end

__all__ = [
    "MAX_TXN_OPS",
    "Compare",
    "KeyValue",
    "Op",
    "RangeResult",
    "TxnResult",
    "create_equals",
    "delete",
    "delete_prefix",
    "exists",
    "get",
    "get_prefix",
    "mod_equals",
    "mod_not_equal",
    "nested_txn",
    "put",
    "value_equals",
    "version_equals",
    "version_less",
]

Op = dict[str, Any]
Compare = dict[str, Any]

MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``: the most operations one branch of a transaction may hold."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def as_int(value: object, default: int = 0) -> int:
    """An int64 field of a gateway response (sent as a string, omitted when zero)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EtcdError(f"malformed etcd response: expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise EtcdError(f"malformed etcd response: expected an integer, got {value!r}") from None


# ---- compares --------------------------------------------------------------------------------


def mod_equals(key: bytes, revision: int) -> Compare:
    """The key's ``mod_revision`` equals ``revision`` (a missing key has 0)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def mod_not_equal(key: bytes, revision: int, *, range_end: bytes | None = None) -> Compare:
    """Every key of ``[key, range_end)`` (or ``key``) has ``mod_revision != revision``.

    Over an empty range etcd compares against an absent key (revision 0), so this holds.
    """
    body: dict[str, Any] = {
        "key": b64(key),
        "target": "MOD",
        "result": "NOT_EQUAL",
        "mod_revision": revision,
    }
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return body


def exists(key: bytes) -> Compare:
    """The key exists (its ``create_revision`` is greater than 0)."""
    return {"key": b64(key), "target": "CREATE", "result": "GREATER", "create_revision": 0}


def create_equals(key: bytes, revision: int, *, range_end: bytes | None = None) -> Compare:
    """The key's ``create_revision`` equals ``revision``; 0 means "the key does not exist".
    With ``range_end``, every key of ``[key, range_end)``: 0 then means "no key in the range"."""
    body: dict[str, Any] = {
        "key": b64(key),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": revision,
    }
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return body


def version_less(key: bytes, version: int) -> Compare:
    """The key's ``version`` (writes since its creation; 0 when absent) is below ``version``."""
    return {"key": b64(key), "target": "VERSION", "result": "LESS", "version": version}


def version_equals(key: bytes, version: int) -> Compare:
    """The key's ``version`` (writes since its creation; 0 when absent) equals ``version``."""
    return {"key": b64(key), "target": "VERSION", "result": "EQUAL", "version": version}


def value_equals(key: bytes, value: bytes) -> Compare:
    """The key exists and its value is exactly ``value``."""
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


# ---- operations -----------------------------------------------------------------------------


def put(key: bytes, value: bytes, *, lease: int = 0) -> Op:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = lease
    return {"request_put": body}


def range_body(
    key: bytes,
    range_end: bytes | None = None,
    *,
    revision: int = 0,
    limit: int = 0,
    keys_only: bool = False,
    count_only: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    if revision:
        body["revision"] = revision
    if limit:
        body["limit"] = limit
    if keys_only:
        body["keys_only"] = True
    if count_only:
        body["count_only"] = True
    return body


def get(key: bytes, range_end: bytes | None = None, **kwargs: Any) -> Op:
    return {"request_range": range_body(key, range_end, **kwargs)}


def get_prefix(prefix: bytes, **kwargs: Any) -> Op:
    return get(prefix, prefix_range_end(prefix), **kwargs)


def nested_txn(
    compare: Sequence[Compare], success: Sequence[Op] = (), failure: Sequence[Op] = ()
) -> Op:
    """A transaction inside a transaction (etcd >= 3.3). Its compares are evaluated against the
    state before the outer transaction's writes, like the outer compares."""
    return {
        "request_txn": {
            "compare": list(compare),
            "success": list(success),
            "failure": list(failure),
        }
    }


def delete(key: bytes, range_end: bytes | None = None) -> Op:
    body: dict[str, Any] = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_delete_range": body}


def delete_prefix(prefix: bytes) -> Op:
    return delete(prefix, prefix_range_end(prefix))


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> KeyValue:
        # The hot path of every listing: plain conversions, one error for any malformed field.
        try:
            return cls(
                key=binascii.a2b_base64(data["key"]),
                value=binascii.a2b_base64(data.get("value", "")),
                create_revision=int(data.get("create_revision", 0)),
                mod_revision=int(data.get("mod_revision", 0)),
                version=int(data.get("version", 0)),
                lease=int(data.get("lease", 0)),
            )
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise EtcdError(f"malformed etcd response: bad key-value {data!r:.200}") from None


def header_revision(data: Mapping[str, Any]) -> int:
    header = data.get("header")
    if not isinstance(header, dict):
        raise EtcdError("malformed etcd response: no header")
    return as_int(header.get("revision"))


@dataclass(frozen=True)
class RangeResult:
    revision: int
    kvs: list[KeyValue]
    count: int
    more: bool

    @classmethod
    def parse(cls, data: Mapping[str, Any], revision: int | None = None) -> RangeResult:
        kvs = data.get("kvs") or []
        if not isinstance(kvs, list):
            raise EtcdError("malformed etcd response: kvs is not a list")
        return cls(
            revision=header_revision(data) if revision is None else revision,
            kvs=[KeyValue.parse(kv) for kv in kvs],
            count=as_int(data.get("count")),
            more=bool(data.get("more", False)),
        )

    def first(self) -> KeyValue | None:
        return self.kvs[0] if self.kvs else None


@dataclass(frozen=True)
class TxnResult:
    """A transaction's outcome. ``succeeded`` is False when a compare failed (the gateway omits
    the field then). ``responses`` are the raw per-op responses of the branch that ran.
    ``ambiguous`` is set when an earlier attempt of the same request may have been applied
    (its response was lost), so a caller can recognise its own earlier write."""

    succeeded: bool
    revision: int
    responses: Sequence[Mapping[str, Any]]
    ambiguous: bool = field(default=False)

    @classmethod
    def parse(cls, data: Mapping[str, Any], ambiguous: bool = False) -> TxnResult:
        responses = data.get("responses") or []
        if not isinstance(responses, list):
            raise EtcdError("malformed etcd response: responses is not a list")
        return cls(
            succeeded=bool(data.get("succeeded", False)),
            revision=header_revision(data),
            responses=responses,
            ambiguous=ambiguous,
        )

    def nested(self, index: int) -> TxnResult:
        """The result of the ``request_txn`` at ``index`` of the branch that ran."""
        try:
            body = self.responses[index]["response_txn"]
        except (IndexError, KeyError, TypeError):
            raise EtcdError(f"malformed etcd response: no txn result at {index}") from None
        responses = body.get("responses") or []
        if not isinstance(responses, list):
            raise EtcdError("malformed etcd response: responses is not a list")
        return TxnResult(bool(body.get("succeeded", False)), self.revision, responses)

    def range(self, index: int) -> RangeResult:
        """The result of the ``request_range`` at ``index`` of the branch that ran."""
        try:
            body = self.responses[index]["response_range"]
        except (IndexError, KeyError, TypeError):
            raise EtcdError(f"malformed etcd response: no range result at {index}") from None
        return RangeResult.parse(body, revision=self.revision)
