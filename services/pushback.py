"""How long a refused caller should wait before it retries: the `grpc-retry-pushback-ms` trailer.

Every RESOURCE_EXHAUSTED refusal of an overloaded server (the cap on calls
in progress, a full batcher queue) carries it. gRPC clients with a retry
policy wait exactly that long before their next attempt (gRFC A6), and the
controller waits at least that long, so the server paces its callers instead
of answering a new refusal every round trip: each refusal costs the server
about as much CPU as a small successful call.

The delay follows the callers being refused. A caller that waits the delay
comes back once per span (delay + a round trip), so the refusal rate times
the span counts the callers, and the delay that brings their refusals down
to `server.refusals_per_second` is their number over that budget. The
server looks once a span has passed (at least `WINDOW` seconds) and moves
the delay halfway there (geometrically), falling by at most half per look
(after a quiet spell of two spans, straight to what it found); or sooner, in a burst (refusals at more than
twice the budget's rate), when it only raises the delay: to the callers
counted so far over the budget, and by at most double beyond that. The
delay stays within `MIN_MS`-`MAX_MS`. Each refusal gets the delay times a
jitter in [0.5, 1.5), so callers refused together do not come back
together. Callers that ignore the trailer are still refused at once; they
only cost the server more, and push the delay towards `MAX_MS` for every
caller.
"""

import random
import time
from collections.abc import Callable

TRAILER = "grpc-retry-pushback-ms"
MIN_MS = 10.0
MAX_MS = 10_000.0
WINDOW = 0.25  # seconds: the shortest time between two looks at the refusals, bursts aside
ROUND_TRIP = 0.005  # seconds a refused caller takes to call again, besides the delay


class RetryPushback:
    """The delay to ask of refused callers; `refused()` counts one refusal and returns its trailer value."""

    def __init__(self, refusals_per_second: int, clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.5)):
        self.budget = refusals_per_second
        self.delay_ms = MIN_MS
        self._clock, self._jitter = clock, jitter
        self._last_look = clock()
        self._count = 0  # refusals since the last look

    def refused(self) -> str:
        """Count a refusal now; the milliseconds (an integer, as text) its caller should wait."""
        now = self._clock()
        self._count += 1
        elapsed = max(now - self._last_look, 1e-6)  # a coarse clock may not have moved
        span = self.delay_ms / 1000 + ROUND_TRIP
        burst = self._count > 2 * self.budget * max(WINDOW, elapsed)
        if elapsed >= max(WINDOW, span) or burst:
            self.delay_ms = min(max(self._wanted(elapsed, span), MIN_MS), MAX_MS)
            self._last_look, self._count = now, 0
        return str(int(self.delay_ms * self._jitter()))

    def _wanted(self, elapsed: float, span: float) -> float:
        callers_ms = 1000 * self._count / elapsed * span / self.budget  # the delay for the callers seen
        if elapsed < span:  # a burst: raise only
            return max(1000 * self._count / self.budget, min(callers_ms, 2 * self.delay_ms), self.delay_ms)
        if elapsed >= max(4 * WINDOW, 2 * span):  # a quiet spell: what it found
            return callers_ms
        return max((self.delay_ms * callers_ms) ** 0.5, self.delay_ms / 2)  # halfway, down by half at most

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata for one refusal."""
        return ((TRAILER, self.refused()),)


def pushback_seconds(error) -> float:
    """The pushback a refused call's trailers ask for, in seconds: 0 when none or not a number, at most
    MAX_MS (what these servers ask at the most)."""
    for key, value in error.trailing_metadata() or ():
        if key == TRAILER:
            try:
                return min(max(int(value), 0), MAX_MS) / 1000
            except ValueError:
                return 0.0
    return 0.0
