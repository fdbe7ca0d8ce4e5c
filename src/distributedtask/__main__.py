"""``python -m distributedtask``: the ``dtask`` command line."""

from .cli import run

run()
