"""Building a py-libp2p host with the settings our measurements chose (../shared/notes).

- Noise only: py-libp2p also offers TLS, secio and plaintext by default.
- GossipSub with meshsub v1.1 only: v1.2 sends an IDONTWANT per message, which cost ~3× in
  sustainable rate here (87 vs 250 msg/s).
- Spam, adaptive-gossip and eclipse protection off: with them gossipsub forwards only
  10 msg/s per topic and wants peers on 3 distinct IPs, which loopback clusters never have.
- A 1 s gossipsub heartbeat instead of 120 s, so meshes form and heal within a second.
- Yamux credit in batches (a WINDOW_UPDATE once 64 KiB is read) instead of py-libp2p's one
  WINDOW_UPDATE for about every other read, however small; see `yamux_credit`.
- A host listening on every interface (0.0.0.0) advertises each interface's address
  instead (`advertised_addrs`): 0.0.0.0 in an identify record, a health view or an mDNS
  announcement would send the peers that dial it to themselves.
- An inbound connection's slot comes back when it closes (`free_inbound_slots_on_close`):
  py-libp2p kept it for the node's life and went deaf to new peers after 250 connections.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import ifaddr
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from .yamux_credit import batch_window_updates

MESHSUB_V11 = TProtocol("/meshsub/1.1.0")

log = logging.getLogger("p2pr.engine")
# py-libp2p logs per message when gossipsub queues for peers not on a topic, and its
# auto-connector reports every second at INFO: both drown what our own logs say.
for _noisy in ("libp2p.pubsub.gossipsub", "libp2p.network.auto_connector"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
# Every redial of a peer that is down (a killed node) logs an ERROR there; the dial planner
# counts failures and backs off, and the health table shows the peer as dead.
logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)
# A stream that cannot be opened (a peer that does not speak the protocol, or is going away)
# is logged there as a 7-line ERROR; the caller gets StreamFailure, and ours handle it.
logging.getLogger("libp2p.host.basic_host").setLevel(logging.CRITICAL)


def listen_addrs(host: str, port: int) -> list[multiaddr.Multiaddr]:
    """The TCP multiaddr to listen on."""
    return [multiaddr.Multiaddr(f"/ip4/{host}/tcp/{port}")]


def interface_ipv4s() -> list[str]:
    """This machine's IPv4 addresses others can reach: every interface's, loopback and
    link-local ones left out; ["127.0.0.1"] when there is no other."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6: (address, flowinfo, scope_id)
            address = ipaddress.IPv4Address(ip.ip)
            if not (address.is_loopback or address.is_link_local) and ip.ip not in found:
                found.append(ip.ip)
    return found or ["127.0.0.1"]


def advertised_addrs(addrs: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """`addrs` with each /ip4/0.0.0.0/… replaced by the same address on every interface
    (`interface_ipv4s`); the others as they are."""
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        text = str(addr)
        if text.startswith("/ip4/0.0.0.0/"):
            rest = text[len("/ip4/0.0.0.0") :]
            out += [multiaddr.Multiaddr(f"/ip4/{ip}{rest}") for ip in interface_ipv4s()]
        else:
            out.append(addr)
    return out


def build_host(
    key_pair: KeyPair,
    addrs: Sequence[multiaddr.Multiaddr],
    psk: str | None = None,
    enable_mdns: bool = False,
) -> IHost:
    """A TCP host that speaks Noise only (and a private network when `psk` is given)."""
    batch_window_updates()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        listen_addrs=list(addrs),
        psk=psk,
        enable_mDNS=enable_mdns,
        addrs_factory=advertised_addrs,
    )
    mdns: Any = getattr(host, "mDNS", None)
    if mdns is not None:
        # The mDNS announcement is built from the raw listen addresses (0.0.0.0 included):
        # announce the advertised ones.
        mdns.broadcaster._resolve_host_addrs = lambda: [
            str(a) for a in advertised_addrs(host.get_transport_addrs())
        ]
    # One attempt per dial: our DialPlanner retries with backoff and forgets addresses that
    # keep failing; py-libp2p's own retries (3 more per address) would multiply every dial.
    network: Any = host.get_network()
    network.retry_config = RetryConfig(max_retries=0)
    free_inbound_slots_on_close(network)
    return host


class _InboundClosed(Exception):
    """An inbound connection closed: ends py-libp2p's handler for it (see below)."""


# Set in the task of py-libp2p's listener handler, for one accepted connection: the other
# callers of `upgrade_inbound_raw_conn` (hole punching, relays) want it to return.
_ACCEPTED: ContextVar[bool] = ContextVar("p2pr_accepted_connection", default=False)


def free_inbound_slots_on_close(network: Any) -> None:
    """Give an inbound connection's slot back when the connection closes.

    py-libp2p 0.8's swarm takes one of its `max_connections - min_connections` (250)
    inbound slots per accepted connection, and its handler then waits for the swarm's end
    (trio closes a listener's stream when its handler returns). A closed connection thus
    keeps its slot, its task and its socket objects: after 250 inbound connections in a
    node's life, counting peers that came back and attackers that redialed, it closed
    every new one before the handshake. Here, in that handler only, the upgrade waits for
    the connection's close and then fails, so the handler returns and frees the slot (its
    clean-up closes what is already closed). A swarm without that handler is left alone.
    """
    handle = getattr(network, "_do_handle_inbound_connection", None)
    if handle is None:
        return
    upgrade = network.upgrade_inbound_raw_conn

    async def handle_accepted(*args: Any, **kwargs: Any) -> Any:
        _ACCEPTED.set(True)  # this handler's task only
        return await handle(*args, **kwargs)

    async def upgrade_until_closed(raw_conn: Any, maddr: multiaddr.Multiaddr) -> Any:
        muxed = await upgrade(raw_conn, maddr)
        closed: trio.Event | None = getattr(muxed, "event_closed", None)
        if closed is None or not _ACCEPTED.get():
            return muxed  # py-libp2p's own behaviour
        await closed.wait()
        raise _InboundClosed(str(maddr))

    network._do_handle_inbound_connection = handle_accepted
    network.upgrade_inbound_raw_conn = upgrade_until_closed


def build_pubsub(
    host: IHost,
    app_score: Callable[[ID], float] | None = None,
    on_bad_input: Callable[[str, str], None] | None = None,
) -> tuple[Pubsub, GossipSub]:
    """Pubsub over a GossipSub router tuned for a small cluster on one LAN.

    `app_score` feeds our own peer-health score to gossipsub's application-specific score
    (P5 in the gossipsub v1.1 spec; `p6_appl_slack` in py-libp2p's scorer). Thresholds stay
    at py-libp2p's permissive defaults: the score is visible to gossipsub's mesh decisions
    without letting one bad minute graylist a peer of a small cluster.
    """
    score = (
        ScoreParams(app_specific_score_fn=app_score, p6_appl_slack_weight=1.0)
        if app_score is not None
        else None
    )
    gossipsub = GossipSub(
        protocols=[MESHSUB_V11],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        spam_protection_enabled=False,
        adaptive_gossip_enabled=False,
        eclipse_protection_enabled=False,
        score_params=score,
    )
    # strict_signing: every message carries its origin's signature, so `from_id` can be
    # trusted as the publisher's identity.
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    if on_bad_input is not None:
        guard_pubsub_streams(host, pubsub, gossipsub, on_bad_input)
    return pubsub, gossipsub


def guard_pubsub_streams(
    host: IHost, pubsub: Pubsub, gossipsub: GossipSub, on_bad_input: Callable[[str, str], None]
) -> None:
    """py-libp2p's pubsub stream handler lets a malformed RPC's protobuf error escape, and
    that ends the whole host: one bad peer would take the node down. Wrap it: the peer's
    stream is reset and dropped from pubsub, the refusal counted against it."""

    async def guarded(stream: INetStream) -> None:
        try:
            await pubsub.stream_handler(stream)
        except Exception as exc:
            peer = stream.muxed_conn.peer_id
            on_bad_input(peer.to_base58(), "malformed pubsub message")
            log.debug("pubsub stream from %s: %r", peer, exc)
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass
            pubsub._handle_dead_peer(peer)

    for protocol in gossipsub.get_protocols():
        host.set_stream_handler(protocol, guarded)
