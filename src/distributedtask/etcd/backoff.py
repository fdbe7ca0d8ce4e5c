"""``Backoff``: the one jittered exponential backoff of the library.

Used wherever something is retried after a failure: the client's retries of a request, the
watch loop between streams, the lease keeper between refreshes and grants. Full jitter (as
tenacity's ``wait_random_exponential`` and the AWS architecture blog's "Exponential Backoff
And Jitter"): the delay before retry ``n`` is drawn uniformly from
``[0, min(maximum, initial * multiplier ** (n - 1))]``, so uncoordinated clients retrying
against one etcd spread out instead of arriving together.

Pure value; thread-safe (``random``'s module functions are).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Backoff", "jittered"]


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Jittered exponential delays: ``initial`` is the first window, growing by ``multiplier``
    up to ``maximum`` (seconds; a window never exceeds it, even the first). Raises
    :class:`ValueError` for a non-positive or infinite bound or a multiplier below 1."""

    initial: float
    maximum: float
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial < math.inf and 0 < self.maximum < math.inf):
            raise ValueError(
                f"initial and maximum must be finite seconds > 0, not {self.initial!r}, "
                f"{self.maximum!r}"
            )
        if not 1 <= self.multiplier < math.inf:
            raise ValueError(f"multiplier must be a finite number >= 1, not {self.multiplier!r}")

    def window(self, attempt: int) -> float:
        """The largest delay before retry ``attempt`` (1 for the first retry)."""
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, not {attempt!r}")
        try:
            return min(self.maximum, self.initial * float(self.multiplier) ** (attempt - 1))
        except OverflowError:
            return self.maximum

    def delay(self, attempt: int) -> float:
        """A random delay in ``[0, window(attempt)]``, in seconds."""
        return random.uniform(0.0, self.window(attempt))


def jittered(seconds: float, spread: float = 0.1) -> float:
    """``seconds`` moved at random by up to ``spread`` of itself either way: a delay that is
    meant to be waited (a run policy's retry backoff), spread so that nodes failing together
    do not retry together."""
    return max(0.0, seconds * random.uniform(1.0 - spread, 1.0 + spread))
