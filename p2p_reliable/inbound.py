"""The inbound streams of one endpoint: live receivers, in order of activity, and resume points.

Live receivers are capped per peer (direct streams) and in total; an envelope that would need
one beyond a cap is refused and counted. A receiver that has nothing left to do is freed once
idle (a direct stream's after `idle_stream_timeout`, any of a removed peer's, or the least
recently active when the total is full): what remains of it is a resume point (epoch, next
sequence number), so that a later message on its stream is delivered once, without a spurious
Gap. Resume points are bounded too, per peer and in total, oldest forgotten first.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Any, Protocol

import attrs

from .events import Gap
from .receiver import ReceiverHost, StreamReceiver
from .timers import TimerQueue

InboundKey = tuple[str, str, bool]  # (origin, stream, direct)
# Reasons of the Rejected events for streams beyond the caps.
TOO_MANY_DIRECT_STREAMS = "too many direct streams"
TOO_MANY_STREAMS = "too many inbound streams"
# Receivers looked at, least recently active first, for one to free when the total is full.
_FREE_SCAN = 64


@attrs.frozen
class ResumePoint:
    """Where a freed receiver stopped: everything of `epoch` below `next` was delivered.

    `continuous`: the stream was followed up to the freeing, so a new receiver starts synced
    at `next`. Otherwise (a topic unsubscribed in between) `next` is only a lower bound for
    the new receiver's start, which the publisher's SYNC gives.
    """

    epoch: int
    next: int
    continuous: bool


class ResumePoints:
    """Resume points by stream, at most `per_origin` per origin and `total` over all."""

    def __init__(self, per_origin: int, total: int) -> None:
        self.per_origin = per_origin
        self.total = total
        self._points: OrderedDict[InboundKey, ResumePoint] = OrderedDict()
        self._count: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._points)

    def get(self, key: InboundKey) -> ResumePoint | None:
        """The point of `key`, if one is kept."""
        return self._points.get(key)

    def take(self, key: InboundKey) -> ResumePoint | None:
        """Remove and return the point of `key`."""
        point = self._points.pop(key, None)
        if point is not None:
            self._uncount(key[0])
        return point

    def put(self, key: InboundKey, point: ResumePoint) -> None:
        """Keep `point` for `key`, forgetting the oldest of its origin (or of all) past a cap."""
        self.take(key)
        origin = key[0]
        if self._count.get(origin, 0) >= self.per_origin:
            oldest = next(k for k in self._points if k[0] == origin)
            self.take(oldest)
        self._points[key] = point
        self._count[origin] = self._count.get(origin, 0) + 1
        while len(self._points) > self.total:
            self.take(next(iter(self._points)))

    def interrupt(self, stream: str) -> None:
        """Topic `stream` was unsubscribed: its points become lower bounds."""
        for key, point in self._points.items():
            if key[1] == stream and not key[2] and point.continuous:
                self._points[key] = attrs.evolve(point, continuous=False)

    def _uncount(self, origin: str) -> None:
        left = self._count[origin] - 1
        if left:
            self._count[origin] = left
        else:
            del self._count[origin]


class StreamsHost(ReceiverHost, Protocol):
    """What the inbound streams need from their endpoint beyond what a receiver does."""

    timers: TimerQueue[Any]

    def connected(self, peer: str) -> bool: ...
    def owed_since(self, origin: str, stream: str) -> float | None: ...


class InboundStreams:
    """Live receivers by stream, least recently active first, within their caps."""

    def __init__(self, host: StreamsHost) -> None:
        cfg = host.config
        self.host = host
        self._live: OrderedDict[InboundKey, StreamReceiver] = OrderedDict()
        self._directs: dict[str, int] = {}
        self.points = ResumePoints(cfg.resume_points_per_peer, cfg.max_resume_points)

    def __len__(self) -> int:
        return len(self._live)

    def get(self, key: InboundKey) -> StreamReceiver | None:
        """The live receiver of `key`."""
        return self._live.get(key)

    def keys(self) -> list[InboundKey]:
        """Every live key, least recently active first."""
        return list(self._live)

    def directs_of(self, origin: str) -> int:
        """How many direct streams from `origin` have a live receiver."""
        return self._directs.get(origin, 0)

    def receiver(
        self, key: InboundKey, epoch: int, now: float, mark: int | None = None
    ) -> StreamReceiver | None:
        """The receiver for an envelope of `key` and `epoch` (or a heartbeat's `mark`: the
        publisher's next seq), created within the caps if need be."""
        host = self.host
        origin, stream, direct = key
        if not direct and host.owed_since(origin, stream) is None:
            host.stats.unknown_stream += 1
            host.health(origin).on_rejected(now, "unknown topic")
            return None
        rcv = self._live.get(key)
        if rcv is not None and rcv.epoch == epoch:
            if mark is None or mark > rcv.high_water:
                self._touch(key, now)  # (a heartbeat repeating what we know is no activity)
            host.timers.touch(rcv)
            return rcv
        point = self.points.get(key)
        newest = rcv.epoch if rcv is not None else point.epoch if point is not None else 0
        if epoch < newest:
            host.stats.stale_epoch += 1
            return None
        had = point.next if point is not None and point.epoch == epoch else 0
        if rcv is not None:
            self._publisher_restarted(key, rcv)
        elif mark is not None and mark <= had:
            return None  # a heartbeat of a stream with nothing we have not had
        elif not self._room_for(origin, direct, now, quiet=mark is not None):
            return None
        return self._new(key, epoch, now)

    def unsubscribed(self, topic: str) -> None:
        """Drop the receivers of `topic`, keeping where they stopped as lower bounds."""
        self.points.interrupt(topic)
        for key in [k for k in self._live if k[1] == topic and not k[2]]:
            rcv = self.drop(key)
            if rcv.synced:
                self.points.put(key, ResumePoint(rcv.epoch, rcv.next, continuous=False))

    def sweep(self, now: float) -> None:
        """Free direct receivers idle for idle_stream_timeout, and any of a removed peer."""
        cutoff = now - self.host.config.idle_stream_timeout
        due = []
        for key, rcv in self._live.items():  # least recently active first: stop at the first
            if rcv.last_active > cutoff:
                break
            due.append((key, rcv))
        for key, rcv in due:
            if not self.host.connected(key[0]):
                rcv.give_up(now)
                self._free(key, rcv)
            elif key[2] and rcv.idle(peer_present=True):
                self._free(key, rcv)
            else:
                self._touch(key, now)  # busy: look again after another timeout

    def wake_stalled(self, now: float) -> None:
        """Retry messages that waited for byte credit their publisher now has."""
        for _ in range(len(self._live) + 1):
            woken = self.host.budget.take_woken()
            if not woken:
                return
            for waiter in woken:
                waiter.retry(now)
                self.host.timers.touch(waiter)

    def drop(self, key: InboundKey) -> StreamReceiver:
        """Stop and release `key`'s receiver."""
        rcv = self._live.pop(key)
        if key[2]:
            left = self._directs[key[0]] - 1
            if left:
                self._directs[key[0]] = left
            else:
                del self._directs[key[0]]
        rcv.close()
        self.host.timers.forget(rcv)
        return rcv

    def _touch(self, key: InboundKey, now: float) -> None:
        self._live[key].last_active = now
        self._live.move_to_end(key)

    def _publisher_restarted(self, key: InboundKey, rcv: StreamReceiver) -> None:
        if rcv.synced and rcv.high_water > rcv.next:
            # What its previous run still owed us is lost.
            stats = self.host.stats
            stats.gaps += 1
            stats.gap_seqs += rcv.high_water - rcv.next
            origin, stream, direct = key
            self.host.emit(
                Gap(origin, stream, rcv.next, rcv.high_water, "publisher restarted", direct)
            )
        self.drop(key)

    def _room_for(self, origin: str, direct: bool, now: float, *, quiet: bool) -> bool:
        """Whether a new receiver for `origin` fits the caps (freeing an idle one if need be);
        if not, it is counted and, unless `quiet` (a heartbeat's mark), refused."""
        cfg = self.host.config
        if direct and self.directs_of(origin) >= cfg.max_direct_streams_per_peer:
            reason = TOO_MANY_DIRECT_STREAMS
        elif len(self._live) >= cfg.max_inbound_streams and not self._free_one():
            reason = TOO_MANY_STREAMS
        else:
            return True
        self.host.stats.too_many_streams += 1
        if not quiet:
            self.host.refuse(origin, reason, now)
        return False

    def _new(self, key: InboundKey, epoch: int, now: float) -> StreamReceiver:
        origin, stream, direct = key
        owed_since = self.host.owed_since(origin, stream) if not direct else None
        resume, synced_at = 0, None
        point = self.points.take(key)
        if point is not None and point.epoch == epoch:
            if point.continuous:
                synced_at = point.next
            else:
                resume = point.next
        rcv = StreamReceiver(
            self.host,
            origin=origin,
            stream=stream,
            epoch=epoch,
            direct=direct,
            now=now,
            owed_since=-math.inf if owed_since is None else owed_since,
            resume=resume,
            synced_at=synced_at,
        )
        self._live[key] = rcv
        if direct:
            self._directs[origin] = self.directs_of(origin) + 1
        self.host.timers.touch(rcv)
        return rcv

    def _free(self, key: InboundKey, rcv: StreamReceiver) -> None:
        """Free a receiver; if it has nothing left to do, remember where it stopped."""
        self.drop(key)
        self.host.stats.receivers_freed += 1
        if rcv.synced and rcv.idle(peer_present=False):
            self.points.put(key, ResumePoint(rcv.epoch, rcv.next, continuous=True))

    def _free_one(self) -> bool:
        """Free the least recently active receiver with nothing left to do, if one is near."""
        for key, rcv in list(itertools.islice(self._live.items(), _FREE_SCAN)):
            if rcv.synced and rcv.idle(peer_present=self.host.connected(key[0])):
                self._free(key, rcv)
                return True
        return False
