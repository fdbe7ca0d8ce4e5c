"""``LeaseKeeper``: one etcd lease kept alive by a thread of our own (etcd3gw has none).

``start()`` grants a lease of ``ttl`` seconds and calls ``on_grant(lease_id)`` so the owner can
bind its keys to it (the Scheduler puts its membership record); both happen on the caller's
thread and raise :class:`~distributedtask.exceptions.EtcdError` if etcd cannot be reached.

The keeper thread refreshes every ``ttl / 3``. The lease is *lost* when a refresh says it no
longer exists (etcd answers TTL -1: it expired while we were cut off, or was revoked) or when no
refresh has succeeded for a whole ``ttl`` (etcd has expired it by then, or will): the keeper then
grants a new lease and calls ``on_grant`` again, which re-registers every key bound to the old
one, retrying with jittered backoff until it succeeds or the keeper stops. ``on_lost`` is told
first, so the owner can count it.

``stop()`` wakes the thread (it waits on an Event, never sleeps), joins it (a thread that does
not end in time is logged with its stack), and revokes the lease, which deletes its keys at once
instead of after the TTL; a revoke that fails is logged, and the lease then simply expires.
Thread-safe; ``stop`` is idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .._threads import stop_and_join
from ..exceptions import EtcdError
from .backoff import Backoff
from .client import EtcdClient

__all__ = ["LeaseKeeper"]

log = logging.getLogger("distributedtask.lease")


class LeaseKeeper:
    """Keep one lease alive; re-grant and re-register when it is lost (see module doc)."""

    def __init__(
        self,
        client: EtcdClient,
        ttl: int,
        on_grant: Callable[[int], None],
        *,
        on_lost: Callable[[], None] | None = None,
        name: str = "distributedtask-lease",
    ) -> None:
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 second, not {ttl}")
        self._client = client
        self.ttl = int(ttl)
        self._on_grant = on_grant
        self._on_lost = on_lost
        self._name = name
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._lease_id = 0
        self._thread: threading.Thread | None = None
        # Never wait longer between attempts than between refreshes.
        self._backoff = Backoff(initial=0.1, maximum=self.ttl / 3)

    @property
    def lease_id(self) -> int:
        with self._lock:
            return self._lease_id

    def start(self) -> int:
        """Grant the lease, call ``on_grant``, start refreshing. Returns the lease id.

        Raises :class:`EtcdError` (nothing keeps running then).
        """
        if self._thread is not None:
            raise RuntimeError("this lease keeper was already started")
        lease_id = self._grant()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return lease_id

    def _grant(self) -> int:
        lease_id = self._client.lease_grant(self.ttl)
        try:
            self._on_grant(lease_id)
        except BaseException:
            self._revoke(lease_id)
            raise
        with self._lock:
            self._lease_id = lease_id
        return lease_id

    def _revoke(self, lease_id: int) -> None:
        try:
            self._client.lease_revoke(lease_id)
        except EtcdError as exc:
            log.warning("could not revoke lease %x (it will expire): %s", lease_id, exc)

    def _run(self) -> None:
        last_ok = time.monotonic()
        failures = 0
        while not self._stop.wait(self.ttl / 3 if failures == 0 else self._backoff.delay(failures)):
            lease_id = self.lease_id
            try:
                remaining = self._client.lease_keepalive(lease_id)
            except EtcdError as exc:
                failures += 1
                if time.monotonic() - last_ok < self.ttl:
                    log.info("lease %x refresh failed (%s); retrying", lease_id, exc)
                    continue
                remaining = -1
            if remaining > 0:
                last_ok, failures = time.monotonic(), 0
                continue
            log.warning("lease %x is lost; granting a new one and registering again", lease_id)
            if self._on_lost is not None:
                self._on_lost()
            failures = self._regrant(failures)
            if failures == 0:
                last_ok = time.monotonic()

    def _regrant(self, failures: int) -> int:
        """Grant anew until it works or we stop; returns the failure count (0 on success)."""
        while not self._stop.is_set():
            try:
                self._grant()
                return 0
            except EtcdError as exc:
                failures += 1
                log.info("granting a new lease failed (%s); retrying", exc)
                if self._stop.wait(self._backoff.delay(failures)):
                    break
        return failures

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop refreshing, join the thread, revoke the lease. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        stop_and_join(self._thread, timeout=timeout, logger=log, what="the lease keeper")
        lease_id = self.lease_id
        if lease_id and not self._client.closed:
            self._revoke(lease_id)
