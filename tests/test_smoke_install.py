"""The project is installed: its packages import and the `p2pr` command is registered."""

from importlib.metadata import entry_points


def test_installed() -> None:
    import discovery
    import inference_glue
    import p2p_reliable
    import router

    for module in (p2p_reliable, router, discovery, inference_glue):
        assert module.__name__

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("p2pr") == "p2pr.cli:main", (
        "the p2pr console script is not registered; run scripts/setup.sh"
    )
