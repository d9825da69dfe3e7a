"""Persistent node identity: one ed25519 key per node, in a file, reused across restarts.

exo gave nodes a fresh random id on every run after cloned disks produced duplicate ids,
which broke everything keyed by node id. Here the key is kept, and the two ways an id can be
duplicated are reported instead of papered over:
- the same identity file used by two live processes on one machine: the second one finds the
  file locked and stops with an error naming the holder (`IdentityInUseError`);
- the same key on two machines (a cloned disk): every node announces a random per-run
  `instance` with its id on the health topic, and two instances alive under one id are
  reported as a duplicate (see discovery.health).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from pathlib import Path
from typing import IO

import attrs
from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

DEFAULT_IDENTITY = Path("~/.p2pr/identity.key")


class IdentityError(Exception):
    """The identity file cannot be used."""


class IdentityInUseError(IdentityError):
    """Another live process holds this identity file."""


@attrs.define
class NodeIdentity:
    """A node's key pair, its peer id, and the lock that keeps the file ours while we run."""

    key_pair: KeyPair
    path: Path | None
    instance: str = attrs.field(factory=lambda: secrets.token_hex(8))
    _lock: IO[bytes] | None = None

    @property
    def node_id(self) -> str:
        """The libp2p peer id, 12D3KooW…."""
        return ID.from_pubkey(self.key_pair.public_key).to_base58()

    def release(self) -> None:
        """Unlock the identity file (also happens when the process exits)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def ephemeral_identity() -> NodeIdentity:
    """A fresh identity that is not stored anywhere (tests, observers)."""
    return NodeIdentity(create_new_key_pair(), None)


def load_identity(path: str | os.PathLike[str] = DEFAULT_IDENTITY) -> NodeIdentity:
    """Load the identity at `path`, creating it on first use; hold its lock while we run.

    Creation is atomic (temp file + rename under the lock), so two nodes starting at once
    cannot both create a key, and the key is never readable by others, not even for a
    moment (the file is created with mode 0600). A corrupt file is an error, never silently
    replaced: the id is what the rest of the cluster knows this node by. As ssh does with
    its keys, a key file that others can read is refused. Every problem with the file is an
    IdentityError with a message that says what to do.
    """
    key_path = Path(path).expanduser()
    try:
        return _load_locked(key_path)
    except IdentityError:
        raise
    except OSError as exc:
        raise IdentityError(f"identity file {key_path}: {exc.strerror or exc}") from None


def _load_locked(key_path: Path) -> NodeIdentity:
    if key_path.is_dir():
        raise IdentityError(f"identity file {key_path} is a directory; give a file path")
    key_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = key_path.with_name(key_path.name + ".lock")
    lock = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "a+b")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().decode(errors="replace").strip() or "unknown"
        lock.close()
        raise IdentityInUseError(
            f"identity {key_path} is in use by another live node (pid {holder}); "
            "give each node its own --identity file"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()).encode())
    lock.flush()
    try:
        key_pair = _read_or_create(key_path)
    except BaseException:
        lock.close()
        raise
    return NodeIdentity(key_pair, key_path, lock=lock)


def key_pair_from_bytes(data: bytes) -> KeyPair:
    """The ed25519 key pair whose 32-byte secret is `data`; ValueError for anything else."""
    try:
        private = Ed25519PrivateKey.from_bytes(data)
    except Exception as exc:
        raise ValueError(f"not an ed25519 secret key ({len(data)} bytes): {exc}") from None
    return KeyPair(private, private.get_public_key())


def read_private(path: Path, what: str) -> bytes:
    """The bytes of a private file (a key, a secret), refused as ssh refuses a key file that
    others can read. IdentityError says what is wrong and what to do."""
    if not path.is_file():
        raise IdentityError(f"{what} {path} is not a regular file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"{what} {path} is readable by others (mode {mode:04o}): anyone who reads it "
            f"can act as this node; run `chmod 600 {path}`"
        )
    return path.read_bytes()


def write_private(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Write a private file atomically (temp file + rename), created 0600 whatever the
    umask: never readable by others, not even for a moment. With `replace=False` an
    existing file is kept (two processes creating it at once: one wins); whether `data`
    was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read_or_create(key_path: Path) -> KeyPair:
    if key_path.exists():
        data = read_private(key_path, "identity file")
        try:
            return key_pair_from_bytes(data)
        except ValueError as exc:
            raise IdentityError(
                f"identity file {key_path} is {exc}; move it away to create a new identity"
            ) from None
    key_pair = create_new_key_pair()
    write_private(key_path, key_pair.private_key.to_bytes())
    return key_pair
