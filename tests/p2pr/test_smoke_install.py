"""The project is installed: its packages import from this checkout and the `p2pr` command is
registered."""

import importlib
from importlib.metadata import distribution, entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("discovery", "exo_swap", "inference_glue", "p2p_reliable", "p2pr", "router")


def test_installed() -> None:
    # Exactly the project's packages are installed (tests/ and examples/ never are) ...
    top_level = distribution("p2p-reliable").read_text("top_level.txt") or ""
    assert sorted(top_level.split()) == sorted(PACKAGES)
    # ... and each imports from this checkout (an editable install), not from a copy.
    for name in PACKAGES:
        module = importlib.import_module(name)
        assert module.__file__ is not None
        assert Path(module.__file__).resolve() == REPO / name / "__init__.py", name

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert "p2pr" in scripts, "the p2pr console script is not registered; run scripts/setup.sh"
    assert scripts["p2pr"].value == "p2pr.cli:main"
    assert scripts["p2pr"].load() is importlib.import_module("p2pr.cli").main
