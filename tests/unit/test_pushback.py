"""The retry delay an overloaded server asks of the callers it refuses (services/pushback.py), and the
controller's retries honouring it."""

import heapq

import grpc

from controller.replicas import backoff, retry_delay
from services.pushback import MAX_MS, MIN_MS, TRAILER, RetryPushback, pushback_seconds


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def callers_retrying(pushback: RetryPushback, clock: Clock, callers: int, seconds: float, honour: bool = True,
                     round_trip: float = 0.005) -> float:
    """`callers` refused again and again for `seconds`, each back after the pushback it was given (or at once,
    without `honour`) plus a round trip; refusals per second over the last half."""
    due = [(clock.now + i * 1e-5, i) for i in range(callers)]
    end, late = clock.now + seconds, 0
    while due[0][0] < end:
        when, caller = heapq.heappop(due)
        clock.now = when
        asked = int(pushback.refused()) / 1000
        wait = asked if honour else 0.0
        late += when >= end - seconds / 2
        heapq.heappush(due, (when + wait + round_trip, caller))
    clock.now = end
    return late / (seconds / 2)


def test_callers_that_honour_it_are_brought_down_to_the_budget_and_quiet_lowers_it():
    clock = Clock()
    pushback = RetryPushback(100, clock=clock, jitter=lambda: 1.0)
    assert int(pushback.refused()) == MIN_MS  # calm: the shortest delay
    rate = callers_retrying(pushback, clock, 96, 10.0)
    assert 50 <= rate <= 200, rate  # about the budget, where they would make 6,400 a second at once
    assert 480 <= pushback.delay_ms <= 1920, pushback.delay_ms  # about 96 callers / 100 a second
    held = pushback.delay_ms
    clock.now += held / 1000 * 1.2  # a span later, a single refusal: down, by half at most
    pushback.refused()
    assert held / 2 <= pushback.delay_ms < held
    clock.now += 5  # a quiet spell: back to the shortest
    assert int(pushback.refused()) == MIN_MS


def test_a_clock_that_does_not_move_is_a_burst_not_an_error():
    clock = Clock()
    pushback = RetryPushback(100, clock=clock, jitter=lambda: 1.0)
    clock.now += 1  # the next look is due, and then nothing moves
    delays = [int(pushback.refused()) for _ in range(200)]
    assert delays[0] == MIN_MS and delays[-1] > MIN_MS


def test_callers_that_ignore_it_drive_it_to_its_bound():
    clock = Clock()
    pushback = RetryPushback(100, clock=clock, jitter=lambda: 1.0)
    callers_retrying(pushback, clock, 96, 3.0, honour=False)
    assert pushback.delay_ms == MAX_MS


def test_each_refusal_gets_a_jittered_delay_in_its_trailer():
    jittered = RetryPushback(100)
    values = {int(jittered.refused()) for _ in range(40)}  # fewer than a burst
    assert min(values) >= MIN_MS * 0.5 and max(values) < MIN_MS * 1.5 and len(values) > 1
    ((key, value),) = jittered.trailers()
    assert key == TRAILER and int(value) >= 0


class Refusal:
    def __init__(self, trailers, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
        self._trailers, self._code = trailers, code

    def trailing_metadata(self):
        return self._trailers

    def code(self):
        return self._code


def test_the_trailer_is_read_and_junk_is_ignored():
    assert pushback_seconds(Refusal(((TRAILER, "1500"),))) == 1.5
    assert pushback_seconds(Refusal(((TRAILER, "-3"),))) == 0.0
    assert pushback_seconds(Refusal(((TRAILER, "86400000"),))) == MAX_MS / 1000  # a day: capped
    assert pushback_seconds(Refusal(((TRAILER, "soon"),))) == 0.0
    assert pushback_seconds(Refusal(None)) == 0.0
    assert pushback_seconds(Refusal((("other", "7"),))) == 0.0


def test_the_controller_waits_at_least_what_the_server_asks():
    assert retry_delay(Refusal(((TRAILER, "6000"),)), 0) == 6.0  # longer than its own first backoff (<= 0.5 s)
    assert retry_delay(Refusal(((TRAILER, "10"),)), 0) >= 0.25  # its own backoff when the server asks for less
    assert retry_delay(Refusal(()), 3) <= backoff(10)
