"""The processes of a live exo check: exo nodes (each in a process group of its own, which
is what gets signalled), CPU burners, and a private network namespace for mDNS.

Every process started here dies with the harness: it gets SIGKILL from the kernel when the
harness goes (PR_SET_PDEATHSIG), and its group is killed when its context ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from .common import exo_env
from .logs import LogScan, LogTail

_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the harness dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(
    cmd: Sequence[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `cmd` in a new session (its own process group), output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def signal_group(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the group start_new_session made for it


def stop_groups(procs: Sequence[subprocess.Popen[bytes] | None], grace: float = 15.0) -> None:
    """SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, then SIGKILL what is left:
    every process group, always, with every wait bounded."""
    for proc in procs:
        signal_group(proc, signal.SIGCONT)
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        if proc is None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        signal_group(proc, signal.SIGKILL)  # children of exo too, if any outlived it
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together so that they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def make_identity(home: Path) -> str:
    """Create the node's persistent identity where exo (through the adapter) will find it."""
    from discovery.identity import load_identity  # our router's identity, not exo's

    identity = load_identity(home / ".config" / "exo" / "node_id.keypair")
    node_id = identity.node_id
    identity.release()
    return node_id


@attrs.define
class ExoNode:
    """One exo node: its HOME and ports stay; each (re)start is a new process and log."""

    index: int
    node_id: str
    home: Path
    api_port: int
    libp2p_port: int
    work: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[LogTail] = attrs.field(factory=list)
    stopped: bool = False  # SIGSTOPped

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def multiaddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.libp2p_port}/p2p/{self.node_id}"

    @property
    def bare_addr(self) -> str:
        """The address without `/p2p/<id>`, as exo's own networking accepted it."""
        return f"/ip4/127.0.0.1/tcp/{self.libp2p_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self, copy: Path, python: str, args: Sequence[str], env: dict[str, str]) -> None:
        log = self.work / f"{self.name}.{len(self.logs) + 1}.log"
        self.logs.append(LogTail(log, self.node_id))
        cmd = [python, "-m", "exo", "--no-downloads", "--api-port", str(self.api_port)]
        cmd += ["--libp2p-port", str(self.libp2p_port), *args]
        self.proc = spawn(cmd, log=log, env=exo_env(copy, self.home, env), cwd=copy)
        self.stopped = False

    def signal(self, sig: int) -> None:
        signal_group(self.proc, sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill(self) -> None:
        """SIGKILL the node's group and wait for it (bounded)."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.stopped = False

    def scan(self) -> LogScan:
        """What the current process's log says so far."""
        return self.logs[-1].poll()

    def scans(self) -> list[LogScan]:
        return [tail.poll() for tail in self.logs]

    def api(self, path: str, timeout: float = 2.0) -> Any:
        url = f"http://127.0.0.1:{self.api_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())

    def answer(self, path: str) -> Any:
        """The API's JSON at `path`; None from a stopped, exited or silent node."""
        if self.stopped or not self.alive:
            return None
        try:
            return self.api(path)
        except (OSError, ValueError):
            return None

    def state_nodes(self) -> frozenset[str] | None:
        """The node ids in this node's API state (topology and identities)."""
        state = self.answer("/state")
        if not isinstance(state, dict):
            return None
        nodes = set(state.get("topology", {}).get("nodes", [])) | set(
            state.get("nodeIdentities", {})
        )
        return frozenset(nodes)

    def api_node_id(self) -> str | None:
        answer = self.answer("/node_id")
        return answer if isinstance(answer, str) else None


@contextlib.contextmanager
def burners(count: int, lifetime: float) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` processes that each keep one core busy; killed when the block ends, and each
    ends by itself after `lifetime` seconds in any case."""
    code = f"import time\nend = time.monotonic() + {lifetime:.0f}\nwhile time.monotonic() < end: pass\n"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(spawn([sys.executable, "-c", code], log=Path(os.devnull)))
        yield procs
    finally:
        for proc in procs:
            signal_group(proc, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


class NetnsUnavailable(RuntimeError):
    """A private network namespace cannot be made here (needs root and iproute2)."""


@contextlib.contextmanager
def private_network() -> Iterator[None]:
    """Run this block (and every process it starts) in a new network namespace whose
    loopback carries multicast, so that mDNS works between local processes.

    Multicast does not work on the host's loopback; a private namespace keeps the mDNS
    traffic on this machine and away from any other process. The harness is single-threaded
    (the namespace is per thread); it returns to its own namespace afterwards, and the
    private one goes away with the last process in it.
    """
    unshare, setns = getattr(os, "unshare", None), getattr(os, "setns", None)
    ip = shutil.which("ip")
    if unshare is None or setns is None or ip is None:
        raise NetnsUnavailable("needs Python >= 3.12 and iproute2 (`ip`)")
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        try:
            unshare(_CLONE_NEWNET)
        except OSError as exc:
            raise NetnsUnavailable(f"unshare(CLONE_NEWNET): {exc} (needs root)") from exc
        try:
            for cmd in (
                [ip, "link", "set", "dev", "lo", "up", "multicast", "on"],
                [ip, "route", "add", "224.0.0.0/4", "dev", "lo"],
            ):
                subprocess.run(cmd, check=True, capture_output=True, timeout=10)
        except (subprocess.SubprocessError, OSError) as exc:
            raise NetnsUnavailable(f"configuring the namespace's loopback: {exc}") from exc
        yield
    finally:
        setns(original, _CLONE_NEWNET)
        os.close(original)
