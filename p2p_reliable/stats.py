"""Counters an endpoint keeps: every rejection and repair is counted, none is silent."""

from __future__ import annotations

import attrs


@attrs.define
class EndpointStats:
    """Totals since the endpoint started."""

    messages_sent: int = 0
    envelopes_sent: int = 0
    bytes_sent: int = 0
    # Every transmission of a sequence number after its first, planned copies excepted; of
    # those, the ones RACK found lost, the ones a NACK asked for, and tail probes.
    retransmits: int = 0
    rack_retransmits: int = 0
    nack_retransmits: int = 0
    probes: int = 0
    # Retransmissions of which the receiver then said it had got the original first.
    spurious_retransmits: int = 0
    redundant_copies: int = 0  # second transmissions of messages sent redundantly
    delivered: int = 0
    delivered_bytes: int = 0
    duplicates: int = 0
    corrupted: int = 0
    malformed: int = 0
    reassembly_failures: int = 0
    overflow_drops: int = 0
    acks_sent: int = 0
    acks_received: int = 0
    nacks_sent: int = 0
    nacks_received: int = 0
    gaps: int = 0
    gap_seqs: int = 0
    unrecoverable: int = 0
    spoofed: int = 0
    auth_rejected: int = 0
    stale_epoch: int = 0
    unknown_stream: int = 0
    window_full: int = 0
    # Receive bounds: refusals of a peer that ignores them (each also a Rejected event) ...
    over_credit: int = 0
    too_many_streams: int = 0
    decompression_refused: int = 0
    # ... and flow: data dropped unacked for bytes, messages waiting for byte credit.
    budget_drops: int = 0
    credit_stalls: int = 0
    receivers_freed: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return attrs.asdict(self)
