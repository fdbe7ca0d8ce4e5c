"""Shared fixtures of our own suite (the etcd fixtures come from distributedtask.testing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.support import FakeClock, scheduler_threads

import distributedtask as dt
from distributedtask.testing.proxy import TcpProxy


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def proxied_client(etcd_proxy: TcpProxy) -> Iterator[dt.EtcdClient]:
    """An EtcdClient whose every request passes through ``etcd_proxy`` (and is counted)."""
    with dt.EtcdClient(etcd_proxy.endpoint, timeout=5.0) as client:
        yield client


@pytest.fixture
def proxied_manager(proxied_client: dt.EtcdClient, dtask_prefix: str) -> dt.Manager:
    return dt.Manager(proxied_client, prefix=dtask_prefix)


@pytest.fixture
def no_scheduler_thread_left() -> Iterator[None]:
    """Used as a mark (``pytest.mark.usefixtures``): set up before the test's own fixtures,
    torn down after them, so after every Scheduler of the test was stopped: none of the
    threads a Scheduler or a ThreadProvider run started is left."""
    before = set(scheduler_threads())
    yield
    assert set(scheduler_threads()) - before == set()
