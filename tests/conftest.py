"""Shared fixtures of our own suite (the etcd fixtures come from distributedtask.testing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.support import FakeClock

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
