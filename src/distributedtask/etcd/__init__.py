"""Everything that speaks to etcd: the client, requests and results, the watch, the lease.

``client`` (policy: retries, deadlines) over ``transport`` (HTTP, endpoints, TLS, auth), with
every failure translated in ``errors`` and every retry paced by ``backoff``; ``txn`` builds
requests and parses results; ``watch`` and ``lease`` run the two background loops.

No module outside this package knows HTTP, JSON-over-gateway, base64 or etcd3gw.
"""

from .client import EtcdClient

__all__ = ["EtcdClient"]
