#!/usr/bin/env bash
# exo, ready to run against this checkout, outside the repository (tests/exo_swap/test_exo_swap.py,
# `python -m p2pr.exo.check`):
#   bash scripts/exo_env.sh [DIR]        (DIR: default a new `mktemp -d` folder)
# 1. extracts exo's archive (EXO_ARCHIVE, default ../shared/exo/exo-81d7cb0fcd66.tar.gz beside
#    this repository) into DIR/exo; exo's source never enters this repository;
# 2. creates DIR/venv with Python 3.13 (PYTHON313, else python3.13 on PATH or from pyenv) and
#    installs exo's dependencies (scripts/exo-requirements.txt: no exo-rs) and this project;
# 3. prints `EXO_SRC=DIR/exo` and `EXO_PYTHON=DIR/venv/bin/python` on stdout (progress goes
#    to stderr).
# Exit status 3 when the archive is missing (the exo tests then skip, saying why).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
ARCHIVE="${EXO_ARCHIVE:-$REPO/../shared/exo/exo-81d7cb0fcd66.tar.gz}"
say() { printf '==> %s\n' "$*" >&2; }

if [ ! -f "$ARCHIVE" ]; then
    say "exo's archive is not here: $ARCHIVE"
    exit 3
fi
DIR="${1:-$(mktemp -d)}"
mkdir -p "$DIR/exo"
DIR=$(cd "$DIR" && pwd)
case "$DIR/" in "$REPO"/*) say "DIR must be outside the repository: $DIR"; exit 2 ;; esac

PY313="${PYTHON313:-}"
if [ -z "$PY313" ]; then
    for candidate in python3.13 "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
            PY313="$candidate"
            break
        fi
    done
fi
[ -n "$PY313" ] || { say "no Python 3.13 found (set PYTHON313)"; exit 1; }

start=$SECONDS
say "extracting $(basename "$ARCHIVE") into $DIR/exo"
tar -xzf "$ARCHIVE" -C "$DIR/exo" --strip-components=1
say "creating $DIR/venv with $("$PY313" -V 2>&1)"
"$PY313" -m venv "$DIR/venv"
PIP=("$DIR/venv/bin/python" -m pip install -q)
pip_filter() { { grep -v "^WARNING: Location 'file:" || true; } >&2; }
"${PIP[@]}" --upgrade pip 2> >(pip_filter)
say "installing exo's dependencies (scripts/exo-requirements.txt)"
"${PIP[@]}" -r scripts/exo-requirements.txt 2> >(pip_filter)
say "installing this project (-e .[test])"
"${PIP[@]}" -e ".[test]" 2> >(pip_filter)
# The project's own dependencies must not move exo's pins (anyio above all).
"$DIR/venv/bin/python" -c 'import anyio, importlib.metadata as m
v = m.version("anyio"); assert v == "4.11.0", f"anyio {v}: exo pins 4.11.0"'
say "exo environment ready in $((SECONDS - start)) s"
echo "EXO_SRC=$DIR/exo"
echo "EXO_PYTHON=$DIR/venv/bin/python"
