"""A delay-based window per peer (after LEDBAT, RFC 6817): keep the queue towards it short.

Every byte a publisher has in flight to a peer waits somewhere: in its own transport queue,
in the network, in the receiver's (a receiver busy decoding reads its socket late). The RTT
samples (ack delay already taken out) grow with that wait, so the queueing delay is the
latest samples' minimum minus the smallest RTT seen in the last minute (the base delay).

It starts at `INITIAL` floors (so that a first burst cannot fill a long queue before any
sample comes back) and doubles per round trip (every acknowledged byte adds one) until the
delay first exceeds `target`. From then on, while the delay is over `target` the window is
cut, at most once per round trip, to what would have kept it at `target` at the same
delivery rate, as TCP Vegas and BBR size theirs. The rate is that of the sample: the bytes
that were in flight when its message was sent drained in its RTT (base + delay), so the
window is that pipe x (base + target) / (base + delay). Not the bytes in flight now: a
sample is a queue's length old, and while the window doubled the queue grew twice over
(the cut would leave it several targets long). While the delay is under `target`, the
window grows by a fraction of each acknowledgement (by at most `GAIN` of itself per round
trip, and only while the application fills half of it). So a larger send window
(`window_bytes`, the ceiling) adds throughput where the path has room and a short queue
where it has not, instead of a long queue in which acknowledgements (of the other
direction too) and latency-critical messages wait and timers expire.

Loss does not shrink the window: frames lost here are lost to damage or faults, not to
overflowing queues (every queue in the path is bounded by flow control instead).
"""

from __future__ import annotations

from collections import deque

GAIN = 1 / 4
INITIAL = 4  # floors
CURRENT_FILTER = 4  # samples whose minimum is the current delay (RFC 6817)
BASE_BUCKET = 10.0  # seconds per base-delay bucket
BASE_BUCKETS = 6  # the base delay is the minimum over the last minute


class DelayWindow:
    """The congestion window towards one peer, in bytes, and what is in flight to it."""

    def __init__(self, target: float | None, floor: int, ceiling: int) -> None:
        self.target = target
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self.window = ceiling if target is None else min(ceiling, INITIAL * self.floor)
        self.in_flight = 0
        self.starting = True  # doubling per round trip until the queue first grows
        # (RTT, bytes in flight when its message was sent, if known) of the latest samples.
        self._current: deque[tuple[float, int | None]] = deque(maxlen=CURRENT_FILTER)
        self._base: deque[tuple[int, float]] = deque()  # (bucket, minimum), oldest first
        self._last_cut = float("-inf")

    def admits(self, size: int) -> bool:
        """Whether `size` more bytes fit (anything fits while nothing is in flight)."""
        return self.in_flight == 0 or self.in_flight + size <= self.window

    def on_sent(self, size: int) -> None:
        """`size` bytes went out for the first time."""
        self.in_flight += size

    def on_settled(self, size: int) -> None:
        """`size` bytes are acknowledged or given up."""
        self.in_flight = max(0, self.in_flight - size)

    def queueing_delay(self) -> float | None:
        """The current delay over the base delay, once both are known."""
        base = self.base_delay()
        if not self._current or base is None:
            return None
        return max(0.0, self._shortest()[0] - base)

    def _shortest(self) -> tuple[float, int | None]:
        return min(self._current, key=lambda sample: sample[0])

    def on_sample(self, rtt: float, now: float, pipe: int | None = None) -> None:
        """An RTT sample (ack delay taken out) arrived at `now`; `pipe`: the bytes in flight
        to the peer when its message was sent (itself included)."""
        self._current.append((rtt, pipe if pipe else None))
        bucket = int(now // BASE_BUCKET)
        if self._base and self._base[-1][0] == bucket:
            self._base[-1] = (bucket, min(self._base[-1][1], rtt))
        else:
            self._base.append((bucket, rtt))
        while self._base and self._base[0][0] <= bucket - BASE_BUCKETS:
            self._base.popleft()

    def base_delay(self) -> float | None:
        """The smallest RTT of the last minute."""
        return min(m for _, m in self._base) if self._base else None

    def on_acked(self, acked: int, in_flight_before: int, now: float) -> None:
        """`acked` bytes were newly acknowledged at `now`, `in_flight_before` in flight."""
        delay, base = self.queueing_delay(), self.base_delay()
        if self.target is None or delay is None or base is None or acked <= 0:
            return
        if delay > self.target:
            self.starting = False
            rtt = base + delay
            if now - self._last_cut >= rtt:
                self._last_cut = now
                pipe = self._shortest()[1]
                drained = in_flight_before if pipe is None else pipe
                fitting = int(drained * (base + self.target) / rtt)
                self.window = max(self.floor, min(self.window, fitting))
            return
        if in_flight_before < self.window / 2:
            return  # the application sends less than the window: it says nothing of room
        if self.starting:
            growth = float(acked)
        else:
            growth = GAIN * acked * (self.target - delay) / self.target
        self.window = int(min(self.ceiling, self.window + growth))
