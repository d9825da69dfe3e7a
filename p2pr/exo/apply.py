"""Apply the adapter to an exo checkout: `python -m p2pr.exo.apply --exo-src DIR`.

exo's checkout stays outside this repository. The overlay replaces three files of
`src/exo/routing/` by two-line modules that re-export ours (exo's originals are kept beside
them as `*.py.exo-orig`), adds `src/exo_rs/` (our Pidfile stand-in), and a placeholder
`dashboard/build/index.html` when the dashboard was never built (exo's API refuses to start
without one). `--revert` puts everything back. `--bare` installs only the bare `exo_rs`
stand-in and leaves exo's routing alone (the baseline that `check` compares against).

Run exo afterwards with `PYTHONPATH=DIR/src` in a Python 3.13 environment that has exo's
dependencies and this project (`pip install -e /path/to/p2p-reliable`) installed, e.g.
`PYTHONPATH=DIR/src python -m exo --no-worker --bootstrap-peers /ip4/…/tcp/…/p2p/12D3KooW…`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

MARKER = "exo_swap overlay"
BACKUP_SUFFIX = ".exo-orig"
DASHBOARD_PLACEHOLDER = "dashboard/build/index.html"

# exo module file (under src/exo/routing) -> our module that replaces it
ROUTING_MODULES = {
    "router.py": "exo_swap.routing_router",
    "topics.py": "exo_swap.routing_topics",
    "connection_message.py": "exo_swap.routing_connection_message",
}
EXO_RS_ADAPTER = "exo_swap.exo_rs_standin"
EXO_RS_BARE = "exo_swap.exo_rs_bare"


class ExoCheckoutError(Exception):
    """The directory is not an exo checkout this adapter fits."""


@attrs.frozen
class Overlay:
    """Where the overlay goes in one exo checkout."""

    root: Path

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def routing(self) -> Path:
        return self.src / "exo" / "routing"

    @property
    def exo_rs(self) -> Path:
        return self.src / "exo_rs" / "__init__.py"

    @property
    def dashboard(self) -> Path:
        return self.root / DASHBOARD_PLACEHOLDER


def checkout(exo_src: str | Path) -> Overlay:
    """The overlay for the exo checkout at `exo_src`; raise if it is not one we fit."""
    root = Path(exo_src).expanduser().resolve()
    overlay = Overlay(root)
    missing = [name for name in ROUTING_MODULES if not (overlay.routing / name).exists()]
    if missing:
        raise ExoCheckoutError(
            f"{root} is not an exo checkout with libp2p-era routing "
            f"(src/exo/routing/{', '.join(missing)} missing): check out the parent of "
            "exo's commit 'libp2p -> zenoh' (81d7cb0fcd66)"
        )
    if not (overlay.routing / "event_router.py").exists():
        raise ExoCheckoutError(f"{root}: src/exo/routing/event_router.py missing")
    return overlay


def _shim(module: str, what: str) -> str:
    return (
        f"# {MARKER}: {what}, from p2p-reliable's {module}.\n"
        "# Written by `python -m p2pr.exo.apply`; `--revert` restores exo's file "
        f"(kept as *{BACKUP_SUFFIX}).\n"
        f"from {module} import *  # noqa: F403\n"
        f"from {module} import __all__  # noqa: F401\n"
    )


def _is_ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(errors="replace").split("\n", 1)[0]
    except OSError:
        return False


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def apply(exo_src: str | Path, *, bare: bool = False) -> list[str]:
    """Install the overlay (or, with `bare`, only the bare exo_rs stand-in); idempotent.

    Returns what was done, one line per file.
    """
    overlay = checkout(exo_src)
    done: list[str] = []
    if not bare:
        for name, module in ROUTING_MODULES.items():
            path = overlay.routing / name
            backup = path.with_name(name + BACKUP_SUFFIX)
            if not _is_ours(path):
                if not backup.exists():
                    path.replace(backup)
                    done.append(f"kept exo's {path.name} as {backup.name}")
            _write(path, _shim(module, f"exo.routing.{name[:-3]}"))
            done.append(f"src/exo/routing/{name} -> {module}")
    elif any(_is_ours(overlay.routing / name) for name in ROUTING_MODULES):
        raise ExoCheckoutError(f"{overlay.root} has the adapter applied: --revert it first")
    standin = EXO_RS_BARE if bare else EXO_RS_ADAPTER
    if overlay.exo_rs.exists() and not _is_ours(overlay.exo_rs):
        raise ExoCheckoutError(f"{overlay.exo_rs} exists and is not ours: not overwritten")
    _write(overlay.exo_rs, _shim(standin, "a pure-Python stand-in for exo_rs"))
    done.append(f"src/exo_rs/__init__.py -> {standin}")
    if not overlay.dashboard.exists():
        _write(
            overlay.dashboard,
            f"<!-- {MARKER}: placeholder, exo's dashboard was not built -->\n"
            "<html><body><p>exo (dashboard not built)</p></body></html>\n",
        )
        done.append(f"{DASHBOARD_PLACEHOLDER} (placeholder)")
    return done


def revert(exo_src: str | Path) -> list[str]:
    """Undo apply(): exo's files back, our files gone."""
    overlay = checkout(exo_src)
    done: list[str] = []
    for name in ROUTING_MODULES:
        path = overlay.routing / name
        backup = path.with_name(name + BACKUP_SUFFIX)
        if backup.exists():
            backup.replace(path)
            done.append(f"restored exo's src/exo/routing/{name}")
        elif _is_ours(path):
            raise ExoCheckoutError(f"{path} is ours but exo's original {backup.name} is gone")
    for path in (overlay.exo_rs, overlay.dashboard):
        if path.exists() and _is_ours(path):
            path.unlink()
            done.append(f"removed {path.relative_to(overlay.root)}")
    if overlay.exo_rs.parent.exists() and not any(
        p for p in overlay.exo_rs.parent.iterdir() if p.name != "__pycache__"
    ):
        for cached in overlay.exo_rs.parent.glob("__pycache__/*"):
            cached.unlink()
        for cache_dir in overlay.exo_rs.parent.glob("__pycache__"):
            cache_dir.rmdir()
        overlay.exo_rs.parent.rmdir()
    return done


def status(exo_src: str | Path) -> str:
    """'adapter', 'bare' or 'exo' (untouched)."""
    overlay = checkout(exo_src)
    if all(_is_ours(overlay.routing / name) for name in ROUTING_MODULES):
        return "adapter"
    if _is_ours(overlay.exo_rs):
        return "bare"
    return "exo"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2pr.exo.apply",
        description="Put exo's routing on p2p-reliable: overlay an exo checkout (outside "
        "this repository) with the adapter modules.",
    )
    parser.add_argument(
        "--exo-src", required=True, help="exo checkout (the directory with src/exo)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--revert", action="store_true", help="restore exo's own files")
    mode.add_argument(
        "--bare", action="store_true", help="only the bare exo_rs stand-in (exo's own routing)"
    )
    mode.add_argument("--status", action="store_true", help="print adapter, bare or exo")
    args = parser.parse_args(argv)
    try:
        if args.status:
            print(status(args.exo_src))
            return 0
        done = revert(args.exo_src) if args.revert else apply(args.exo_src, bare=args.bare)
    except (ExoCheckoutError, OSError) as exc:
        print(f"p2pr.exo.apply: {exc}", file=sys.stderr)
        return 2
    for line in done:
        print(line)
    if not args.revert:
        src = checkout(args.exo_src).src
        print(f"run exo with: PYTHONPATH={src} python -m exo ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
