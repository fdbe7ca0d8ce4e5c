"""Benchmarks of distributedtask: speed, cost and scale, each against a baseline of the same run.

Run ``python -m benchmarks`` (or ``make bench``); ``--help`` lists the options. Every figure is
a ratio against a baseline measured in the same run, on the same etcd, because the machines are
shared and noisy. See ``benchmarks/README.md`` for the cases, their methods and the results.
"""
