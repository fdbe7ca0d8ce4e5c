"""Helpers of our own suite (imported by tests; the etcd fixtures come from the plugin)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import distributedtask as dt
from distributedtask.keys import prefix_range_end


class FakeClock:
    """A settable clock for the Manager: aware UTC, moves only when told."""

    def __init__(self) -> None:
        self._now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


def keys_under(client: dt.EtcdClient, prefix: str) -> list[bytes]:
    """Every key under ``prefix`` (a test's own prefix), read directly."""
    root = (prefix.rstrip("/") + "/").encode()
    return [kv.key for kv in client.range(root, prefix_range_end(root), keys_only=True).kvs]
