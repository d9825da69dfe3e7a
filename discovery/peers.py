"""Where peers are: bootstrap flags, `P2PR_BOOTSTRAP_PEERS`, a static peers file, and
addresses learned by peer exchange (`ExchangeBook`). When to dial them is the router's
(`router.dialplan.DialPlanner`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from router.dialplan import PeerAddressError, peer_in, peer_of

__all__ = [
    "BOOTSTRAP_ENV",
    "ExchangeBook",
    "PeerAddressError",
    "bootstrap_addrs",
    "parse_addrs",
    "peer_in",
    "peer_of",
    "read_peers_file",
]

BOOTSTRAP_ENV = "P2PR_BOOTSTRAP_PEERS"


def parse_addrs(values: Iterable[str]) -> list[str]:
    """Multiaddrs from flags or the environment (comma-separated), validated, deduplicated;
    the /p2p/<id> part is optional."""
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            addr = part.strip()
            if addr and addr not in out:
                peer_in(addr)
                out.append(addr)
    return out


def bootstrap_addrs(flags: Sequence[str] = (), environ: dict[str, str] | None = None) -> list[str]:
    """Bootstrap peers from `--bootstrap` flags and `P2PR_BOOTSTRAP_PEERS`, like exo's
    `EXO_BOOTSTRAP_PEERS`."""
    env = (os.environ if environ is None else environ).get(BOOTSTRAP_ENV, "")
    return parse_addrs([*flags, env])


def read_peers_file(path: str | os.PathLike[str]) -> list[str]:
    """A static peers file: one multiaddr per line; blank lines and `#` comments ignored."""
    lines = Path(path).expanduser().read_text().splitlines()
    wanted = [line.split("#", 1)[0].strip() for line in lines]
    try:
        return parse_addrs(a for a in wanted if a)
    except PeerAddressError as exc:
        raise PeerAddressError(f"{path}: {exc}") from None


class ExchangeBook:
    """Addresses learned by peer exchange that were already handed to the dialer: each is
    passed on once (the dialer forgets it after a failure), at most `per_source` from one
    view, and the book itself is bounded (oldest forgotten first)."""

    def __init__(self, per_source: int = 16, capacity: int = 1024) -> None:
        self.per_source = per_source
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.capped = 0

    def fresh(self, addrs: Iterable[str]) -> list[str]:
        """The addresses of one view not passed on before, well-formed, at most per_source."""
        out: list[str] = []
        for addr in addrs:
            if addr in self._seen or addr in out:
                continue
            try:
                if peer_in(addr) is None:
                    continue  # exchange entries always name their peer
            except PeerAddressError:
                continue
            if len(out) >= self.per_source:
                self.capped += 1
                continue
            out.append(addr)
        for addr in out:
            self._seen[addr] = None
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        return out
