"""Everything that speaks to etcd: the client, transaction builders, the resumable watch.

No module outside this package knows HTTP, JSON-over-gateway, base64 or etcd3gw.
"""

from .client import EtcdClient

__all__ = ["EtcdClient"]
