"""Several "machines" on one LAN for tests: Linux network namespaces joined by a bridge.

    with NetnsLan(3) as lan:                      # or: skip_reason() says why it cannot
        a, b, c = lan.machines                     # each: its namespace, its own address
        proc = lan.popen(a, ["p2pr", "node", "--listen", f"/ip4/{a.address}/tcp/0"])
        lan.run(b, ["python", "-c", "..."], timeout=30)

Each machine is a namespace with `lo` and one `eth0`, the end of a veth pair whose other
end is a port of a bridge in the root namespace: a switch. The bridge holds the LAN's first
address, so the root namespace (the test) reaches every machine; machines reach each other
through the bridge. Each link is capped at 1 Gbit/s both ways by `tc qdisc tbf` (netem is
not in every kernel). Multicast works: the bridge floods it (snooping off) and every
machine routes 224.0.0.0/4 to eth0, so mDNS finds peers between machines.

Names carry this process's id (namespaces `p2r-<pid>-<n>-<i>`, links `p2rb<pid>-<n>`,
`p2rh<pid>-<n>-<i>`, the pid in base 36 to fit 15 characters) and each LAN
its own /24 out of 10.231.100.0-10.231.199.255, chosen under a lock among those no route
of the root namespace covers: parallel runs cannot collide. Teardown (processes started
here, then namespaces, veths and the bridge) runs whatever ends the `with` (a failing
test, Ctrl-C); leftovers of a run that was killed outright are removed by the next run,
which finds their creator's process gone.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from p2pr.launch import Launched

__all__ = ["LINK_RATE_BITS", "Machine", "NetnsError", "NetnsLan", "skip_reason"]

LINK_RATE_BITS = 1_000_000_000
PREFIX = "p2r-"
LINK_PREFIXES = ("p2rb", "p2rh", "p2rp")
SUBNETS = [ipaddress.ip_network(f"10.231.{n}.0/24") for n in range(100, 200)]
LOCK = Path(tempfile.gettempdir()) / "p2pr-netns.lock"
COMMAND_TIMEOUT = 30.0
_counter = 0


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up; says which command and why."""


@attrs.frozen
class Machine:
    """One namespace on the LAN."""

    index: int
    namespace: str
    address: str
    host_link: str  # its veth's end on the bridge, in the root namespace

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this machine."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if check and result.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _tc(namespace: str | None, *args: str) -> None:
    argv = ["tc", *args] if namespace is None else ["ip", "netns", "exec", namespace, "tc", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if result.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can): root, iproute2 and a kernel
    that allows a namespace, a bridge and a tbf qdisc are needed."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"network namespaces need iproute2 ({', '.join(missing)} not found)"
    try:
        with NetnsLan(1):
            pass
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create network namespaces here: {exc}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _b36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def _creator(name: str) -> int | None:
    """The pid a leftover namespace or link name carries, if it is one of ours."""
    try:
        if name.startswith(PREFIX):
            return int(name[len(PREFIX) :].split("-")[0])
        if name.startswith(LINK_PREFIXES):
            return int(name[4:].split("-")[0], 36)
    except ValueError:
        return None
    return None


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def sweep_leftovers() -> list[str]:
    """Remove namespaces and links of runs whose process is gone; what was removed."""
    removed = []
    for namespace in _namespaces():
        pid = _creator(namespace)
        if pid is not None and namespace.startswith(PREFIX) and not _alive(pid):
            _kill_namespace_processes(namespace)
            _ip("netns", "del", namespace, check=False)
            removed.append(namespace)
    for link in _links():
        pid = _creator(link)
        if pid is not None and link.startswith(("p2rb", "p2rh")) and not _alive(pid):
            _ip("link", "del", link, check=False)
            removed.append(link)
    return removed


def _kill_namespace_processes(namespace: str) -> None:
    """SIGKILL what still runs inside `namespace` (started there by this harness)."""
    out = _ip("netns", "pids", namespace, check=False).stdout
    for pid in (int(p) for p in out.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-4", "-j", "route", "show", "table", "all", check=False).stdout
    networks = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                networks.append(
                    ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
                )
    return [n for n in networks if isinstance(n, ipaddress.IPv4Network)]


class NetnsLan:
    """`count` machines on one bridged LAN (see the module docstring)."""

    def __init__(self, count: int, rate_bits: int = LINK_RATE_BITS) -> None:
        if not 1 <= count <= 200:
            raise ValueError(f"1 to 200 machines, not {count}")
        global _counter
        _counter += 1
        self.count = count
        self.rate_bits = rate_bits
        self.tag = f"{_b36(os.getpid())}-{_b36(_counter)}"
        self.bridge = f"p2rb{self.tag}"
        self.namespace_prefix = f"{PREFIX}{os.getpid()}-{_counter}-"
        self.network: ipaddress.IPv4Network | None = None
        self.machines: list[Machine] = []
        self._procs: list[subprocess.Popen[Any]] = []
        if len(self._link(count)) > 15:
            raise NetnsError(f"link names for tag {self.tag!r} exceed 15 characters")

    def _link(self, index: int, kind: str = "h") -> str:
        """The name of machine `index`'s veth end: "h" on the bridge, "p" its peer."""
        return f"p2r{kind}{self.tag}-{_b36(index)}"

    def _mine(self, link: str) -> bool:
        return link == self.bridge or link.startswith((f"p2rh{self.tag}-", f"p2rp{self.tag}-"))

    @property
    def gateway(self) -> str:
        """The bridge's address: the root namespace on this LAN."""
        assert self.network is not None
        return str(self.network.network_address + 1)

    # -- setting up -----------------------------------------------------------------------

    def __enter__(self) -> NetnsLan:
        # Also at interpreter exit (an exit from elsewhere); a SIGKILL leaves it to the
        # next run's sweep.
        atexit.register(self.close)
        try:
            sweep_leftovers()
            with LOCK.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._create_bridge()  # its route marks the subnet taken for other runs
            for index in range(self.count):
                self.machines.append(self._create_machine(index))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create_bridge(self) -> None:
        used = _used_networks()
        free = [n for n in SUBNETS if not any(n.overlaps(u) for u in used)]
        if not free:
            raise NetnsError("no free /24 left in 10.231.100.0-10.231.199.255")
        self.network = free[0]
        _ip("link", "add", self.bridge, "type", "bridge")
        # Snooping would drop multicast no querier has seen a member for: mDNS needs it all.
        _ip("link", "set", self.bridge, "type", "bridge", "mcast_snooping", "0")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def _create_machine(self, index: int) -> Machine:
        assert self.network is not None
        namespace = f"{self.namespace_prefix}{index}"
        host_link, peer_link = self._link(index), self._link(index, "p")
        address = str(self.network.network_address + 2 + index)
        _ip("netns", "add", namespace)
        _ip("link", "add", host_link, "type", "veth", "peer", "name", peer_link)
        _ip("link", "set", peer_link, "netns", namespace)
        _ip("-n", namespace, "link", "set", peer_link, "name", "eth0")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "route", "add", "224.0.0.0/4", "dev", "eth0")
        _ip("link", "set", host_link, "master", self.bridge, "up")
        # Both directions of the link: the machine's sending on eth0, its receiving on the
        # bridge port. tbf needs a bucket of at least one packet; 512 KiB smooths bursts.
        tbf = ["root", "tbf", "rate", f"{self.rate_bits}bit", "burst", "512kb", "latency", "50ms"]
        _tc(namespace, "qdisc", "add", "dev", "eth0", *tbf)
        _tc(None, "qdisc", "add", "dev", host_link, *tbf)
        return Machine(index, namespace, address, host_link)

    # -- running --------------------------------------------------------------------------

    def popen(
        self,
        machine: Machine,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        env: dict[str, str] | None = None,
        text: bool = True,
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside `machine`; it is ended at teardown if still running."""
        proc = subprocess.Popen(
            machine.command(argv), stdout=stdout, stderr=stderr, env=env, text=text
        )
        self._procs.append(proc)
        return proc

    def launch(
        self, machine: Machine, argv: Sequence[str], *, label: str, log_path: Path | None = None
    ) -> Launched:
        """Start one of our processes (`p2pr.launch`: JSON event lines) inside `machine`; it
        is ended at teardown if still running."""
        process = Launched(machine.command(argv), label=label, log_path=log_path)
        self._procs.append(process.proc)
        return process

    def run(
        self,
        machine: Machine,
        argv: Sequence[str],
        *,
        timeout: float,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `machine` to its end (bounded by `timeout`)."""
        return subprocess.run(
            machine.command(argv), capture_output=True, text=True, timeout=timeout, env=env
        )

    def qdisc(self, machine: Machine) -> dict[str, Any]:
        """The root qdisc of the machine's eth0, as `tc -j` reports it."""
        out = subprocess.run(
            machine.command(["tc", "-j", "qdisc", "show", "dev", "eth0"]),
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True,
        ).stdout  # fmt: skip
        roots = [q for q in json.loads(out) if q.get("root")]
        return dict(roots[0]) if roots else {}

    # -- tearing down ---------------------------------------------------------------------

    def close(self) -> None:
        """End the processes started here, remove namespaces, veths and the bridge. Safe to
        call twice, and after a set-up that failed half-way."""
        atexit.unregister(self.close)
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()
        for namespace in _namespaces():
            if namespace.startswith(self.namespace_prefix):
                _kill_namespace_processes(namespace)
                _ip("netns", "del", namespace, check=False)
        for link in _links():
            if self._mine(link):
                _ip("link", "del", link, check=False)
        self.machines.clear()

    def leftovers(self) -> list[str]:
        """Namespaces and links of this LAN that still exist (none after `close`)."""
        mine = [n for n in _namespaces() if n.startswith(self.namespace_prefix)]
        return mine + [link for link in _links() if self._mine(link)]
