"""distributedtask: tasks every node of a cluster must run, coordinated through etcd.

The public names of the API contract (spec/API.md), importable as ``import distributedtask as
dt``. See :class:`Manager` for the transitions and :class:`EtcdClient` for the connection.
"""

from .etcd.client import EtcdClient
from .exceptions import (
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
from .manager import Manager
from .model import (
    Progress,
    RunPolicy,
    Task,
    TaskDescriptor,
    TaskStatus,
    Unit,
    UnitSpec,
    UnitStatus,
)
from .provider import (
    Provider,
    TaskCompletionRecorder,
    TaskContext,
    TaskHandle,
    ThreadProvider,
)
from .scheduler import Scheduler

__version__ = "0.1.0"

__all__ = [
    "CorruptRecordError",
    "DistributedTaskError",
    "EtcdClient",
    "EtcdError",
    "InvalidTaskError",
    "Manager",
    "NoEligibleNodesError",
    "Progress",
    "Provider",
    "RunPolicy",
    "Scheduler",
    "StorageFormatError",
    "Task",
    "TaskAlreadyRunningError",
    "TaskCompletionRecorder",
    "TaskContext",
    "TaskDescriptor",
    "TaskHandle",
    "TaskNotFoundError",
    "TaskNotRunningError",
    "TaskStatus",
    "TaskStillRunningError",
    "TaskTooFreshError",
    "ThreadProvider",
    "Unit",
    "UnitClaimError",
    "UnitSpec",
    "UnitStatus",
]
