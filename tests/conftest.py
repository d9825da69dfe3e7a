"""What the test folders share: the tiny seeded models, built once per session, and
`p2pr node` processes started through the application's one launcher (`p2pr.launch`).

The tests mirror the packages (`tests/p2p_reliable/`, `tests/router/`, `tests/discovery/`,
`tests/inference_glue/`, `tests/exo_swap/`, `tests/p2pr/`); test file names are unique
across them (pytest imports each by its name).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import NetnsLan, skip_reason
from support import P2prNode

from p2pr.launch import stop_all


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_models(seed=0, num_layers=None, **options)`: the tiny seeded random llama model
    (`inference_glue.tiny_model.build_tiny_model`) of those settings, built once per
    session. Tests read these directories; a test that changes a model builds its own."""
    from inference_glue.tiny_model import build_tiny_model

    built: dict[tuple[Any, ...], Path] = {}

    def tiny(seed: int = 0, num_layers: int | None = None, **options: Any) -> Path:
        key = (seed, num_layers, *sorted(options.items()))
        if key not in built:
            if num_layers is not None:
                options["num_layers"] = num_layers
            where = tmp_path_factory.mktemp(f"tiny-seed{seed}-layers{num_layers or 'default'}")
            built[key] = build_tiny_model(where / "model", seed=seed, **options)
        return built[key]

    return tiny


@pytest.fixture(scope="session")
def tiny_dir(tiny_models: Callable[..., Path]) -> Path:
    """The tiny model most tests use: seed 0, its default layers."""
    return tiny_models(0)


@pytest.fixture(scope="session")
def tiny_8_layers(tiny_models: Callable[..., Path]) -> Path:
    """Eight layers (seed 3): three stages of 3/3/2, and room to re-plan them over two
    nodes or one."""
    return tiny_models(3, num_layers=8)


@pytest.fixture
def p2pr_nodes() -> Iterator[Callable[..., P2prNode]]:
    """`start(*args, faults=None)`: a `p2pr node` process, stopped at the end of the test
    (all at once: each takes a moment to close its connections)."""
    started: list[P2prNode] = []

    def start(*args: str, faults: str | None = None) -> P2prNode:
        node = P2prNode(*args, faults=faults)
        started.append(node)
        return node

    yield start
    stop_all([node.process for node in started], timeout=10)


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Skip, saying why, where network namespaces cannot be made."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def lan(netns_available: None) -> Iterator[NetnsLan]:
    """Three "machines" (network namespaces on a bridge), removed after the test."""
    with NetnsLan(3) as made:
        yield made
    assert made.leftovers() == []
