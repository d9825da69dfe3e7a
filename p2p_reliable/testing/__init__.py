"""Test support: a deterministic simulated network for Endpoints."""

from .simnet import LinkFaults, LinkStats, Partition, SimNetwork, SimNode

__all__ = ["LinkFaults", "LinkStats", "Partition", "SimNetwork", "SimNode"]
