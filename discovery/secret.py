"""The cluster secret a node keeps, as it keeps its identity: one file, private, reused.

A node that listens where other machines reach it must not let just anyone in: every
envelope carries a tag keyed by the cluster secret, and a peer without it is refused
(`EngineConfig.cluster_secret`). The first `p2pr serve` on a machine that is given no
secret makes one here (`~/.p2pr/cluster.secret`, mode 0600, like the identity key) and
prints the command that lets other machines join with it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .identity import IdentityError, read_private, write_private

__all__ = ["DEFAULT_SECRET", "SECRET_BYTES", "load_or_create_secret"]

DEFAULT_SECRET = Path("~/.p2pr/cluster.secret")
SECRET_BYTES = 32
# A secret read from a file is text (what `--cluster-secret` takes), at most this long.
_MAX_SECRET = 1024


def load_or_create_secret(path: str | os.PathLike[str] = DEFAULT_SECRET) -> tuple[str, bool]:
    """The secret kept at `path`, made (32 random bytes, as hex) if there is none yet; and
    whether it was made now. IdentityError for a file that others can read, that is empty,
    too long or not text."""
    secret_path = Path(path).expanduser()
    if not secret_path.exists():
        made = secrets.token_hex(SECRET_BYTES)
        if write_private(secret_path, (made + "\n").encode(), replace=False):
            return made, True
    data = read_private(secret_path, "cluster secret file")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not text or len(text) > _MAX_SECRET or any(c.isspace() for c in text):
        raise IdentityError(
            f"cluster secret file {secret_path} does not hold one secret (one line of at "
            f"most {_MAX_SECRET} printable characters); move it away to make a new one"
        )
    return text, False
