"""Test harness for distributedtask and for tests of your providers: real etcd, broken networks.

- `EtcdServer`, `EtcdCluster`: etcd on 127.0.0.1, run as a process or in a Docker container
  (`select_backend`, ``$DTASK_ETCD_BACKEND``), that tests may kill, pause, restart and compact.
- `TcpProxy`: a forwarder that can cut or block connections and counts HTTP requests.
- `wait_until`: the one way tests wait for a condition.
- Gateway helpers (`kv_put`, `kv_get`, `current_revision`, `compact`, `enable_auth`, ...).
- A pytest plugin (`distributedtask.testing.plugin`, loaded through the ``pytest11`` entry
  point) with the fixtures ``etcd_server``, ``etcd_endpoint``, ``etcd_private``,
  ``etcd_cluster``, ``etcd_proxy``, ``dtask_prefix``, ``etcd_client`` and ``manager``.

Threading and failure semantics are documented in the `etcd` and `proxy` modules. Importing
this package needs ``requests`` only; the docker backend imports testcontainers when used.
"""

from distributedtask.testing.etcd import (
    BACKEND_ENV,
    EtcdCluster,
    EtcdHarnessError,
    EtcdHttpError,
    EtcdServer,
    auth_token,
    build_image,
    compact,
    current_revision,
    docker_available,
    enable_auth,
    etcd_binary,
    etcd_image_tag,
    free_port,
    gateway_call,
    kv_get,
    kv_put,
    prefix_range_end,
    select_backend,
    wait_until,
)
from distributedtask.testing.proxy import RequestCounter, TcpProxy

__all__ = [
    "BACKEND_ENV",
    "EtcdCluster",
    "EtcdHarnessError",
    "EtcdHttpError",
    "EtcdServer",
    "RequestCounter",
    "TcpProxy",
    "auth_token",
    "build_image",
    "compact",
    "current_revision",
    "docker_available",
    "enable_auth",
    "etcd_binary",
    "etcd_image_tag",
    "free_port",
    "gateway_call",
    "kv_get",
    "kv_put",
    "prefix_range_end",
    "select_backend",
    "wait_until",
]
