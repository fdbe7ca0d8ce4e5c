"""The bounded chaos run (tests/faults/chaos.py has the scenario and every invariant it checks).

Three Schedulers on a three-member etcd cluster; for ``DURATION`` seconds the fault loop kills
the leader, kills a follower, pauses a member and cuts ``node-c`` off for longer than its member
TTL (but shorter than the node-loss grace: no run may fail for node loss), while a client makes
its ``TASKS`` adds (about 30% on an id used before, about 30% with a run policy: 2-3 attempts,
some with a deadline of a few seconds), cancels about a fifth of the runs, and pauses about
a sixth of them (a third of those with a policy), then resumes them (or cancels them while
PAUSED). About 30% of the adds are unit tasks (5-40 units, in groups or not, some bound to a
node, most with 2-4 attempts per unit), run by ThreadProviders with ``unit_concurrency`` 1-3
whose unit functions sometimes fail and whose ``group_completed`` sometimes raises; every
unit's claim is watched, so a unit COMPLETED twice, lost (its run never ends), retried past
``max_attempts`` or recorded by a node that did not run it is a violation. The seed is printed
(and is in the failure message); set ``DTASK_CHAOS_SEED`` to replay one. The long version runs
by hand: ``python -m tests.faults.chaos --duration 600 --seed N``.
"""

from __future__ import annotations

import os
import random

import pytest
from tests.faults.chaos import ChaosConfig, run_chaos

from distributedtask.testing.etcd import EtcdCluster

DURATION = 40.0
TASKS = 150


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_chaos_keeps_every_invariant(etcd_cluster: EtcdCluster, dtask_prefix: str) -> None:
    seed = int(os.environ.get("DTASK_CHAOS_SEED") or random.randrange(2**32))
    print(f"chaos seed {seed} (replay with DTASK_CHAOS_SEED={seed})")
    config = ChaosConfig(
        seed=seed, duration=DURATION, tasks=TASKS, prefix=dtask_prefix, settle_timeout=60.0
    )
    report = run_chaos(etcd_cluster, config)
    print("\n".join(f"fault: {line}" for line in report.fault_log))
    print(report.summary())
    details = "\n".join(report.violations[:60])
    assert report.ok, f"{report.summary()}\n{details}"
    assert {"kill-leader", "kill-follower", "pause", "cut"} <= set(report.faults), report.summary()
    assert report.added + report.ambiguous_adds + report.refused_adds == TASKS
    assert report.replaced_ids > 0  # some runs replaced an earlier run of their id
    assert sum(report.statuses.values()) == report.runs >= report.added
    assert report.max_concurrent == 1
    assert report.cut_lapses >= 1
    assert report.loss_failures == 0  # every cut was shorter than the grace
    # the run policy was exercised: retried attempts, pauses resumed, deadlines enforced
    assert report.policy_runs > 0 and report.retries > 0, report.summary()
    assert report.controls["pause ok"] > 0 and report.resume_starts > 0, report.summary()
    assert report.deadline_failures > 0, report.summary()
    # units were exercised: retried, FINISHED runs read whole with get_units, group callbacks
    assert report.unit_runs > 0 and report.unit_statuses["FINISHED"] > 0, report.summary()
    assert report.unit_retries > 0 and report.unit_reads["ok"] > 0, report.summary()
    assert report.group_callbacks > 0, report.summary()
    assert report.max_unit_active > 1 or max(report.unit_concurrency.values()) == 1
