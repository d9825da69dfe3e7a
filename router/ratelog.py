"""Logging about peers without letting a peer flood the log.

A peer that sends 5,000 bad frames must not produce 5,000 WARNING lines. `RateLimitedLog`
lets one line per (peer, kind) through every `interval` seconds and counts the rest; the
next line that goes through says how many were held back. The table of keys is bounded: a
flood of peer ids cannot grow it without limit.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any


class RateLimitedLog:
    """`logger`, at most one line per (peer, kind) per `interval` seconds."""

    def __init__(
        self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 1024
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._keys: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def log(self, level: int, peer: str, kind: str, msg: str, *args: Any) -> bool:
        """Log `msg % args` unless (peer, kind) logged within `interval`; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        key = (peer, kind)
        last, held = self._keys.get(key, (-float("inf"), 0))
        if now - last < self.interval:
            self._keys[key] = (last, held + 1)
            return False
        self._keys[key] = (now, 0)
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        if held:
            msg += f" ({held} more like it in the last {self.interval:.0f} s not logged)"
        self.logger.log(level, msg, *args)
        return True

    def warning(self, peer: str, kind: str, msg: str, *args: Any) -> bool:
        """`log` at WARNING."""
        return self.log(logging.WARNING, peer, kind, msg, *args)

    def info(self, peer: str, kind: str, msg: str, *args: Any) -> bool:
        """`log` at INFO."""
        return self.log(logging.INFO, peer, kind, msg, *args)
