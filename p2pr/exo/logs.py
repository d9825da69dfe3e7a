"""What an exo node's log says: whom it follows, how many election rounds it ran, and the
evidence of known failure kinds (lost election messages, false duplicate identities,
exceptions). Read incrementally, so that polling a growing log stays cheap.

exo logs (loguru, one line per record, `[ 03:24:29.9219PM | INFO    ] message`):
- an election result: `Node elected Master - maintaining self` / `- promoting self`,
  `Node <id> elected master - demoting self`, `Node <id> elected master`;
- every campaign after its first: `Waiting for other campaign to finish` (exo.shared.election
  logs it whenever a previous campaign exists), so campaigns counted here are election rounds
  this node joined or started.
Our router's records reach the same log through exo's logging: `Gap(...)`,
`Unrecoverable(...)`, `node … reports another live node using MY identity …`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RECORD = re.compile(r"^\[ (?P<time>[0-9:.]+[AP]M) \| (?P<level>\w+)\s*\] (?P<message>.*)$")
_SELF_MASTER = re.compile(r"Node elected Master - (?:maintaining|promoting) self")
_OTHER_MASTER = re.compile(r"Node (12D3KooW\w+) elected master")
_CAMPAIGN = "Waiting for other campaign to finish"
_GAP = re.compile(r"\bGap\(.*?stream='(?P<stream>[^']*)'.*?reason='(?P<reason>[^']*)'")
_UNRECOVERABLE = re.compile(
    r"\bUnrecoverable\(stream='(?P<stream>[^']*)'.*?reason='(?P<reason>[^']*)'"
)
_DUPLICATE = "reports another live node using MY identity"
_NODE_ID = re.compile(r"\bnode id (12D3KooW\w+) \(identity file")
# The last line of a traceback, `package.SomeError: message` (inside an exception group's
# drawing, `  | package.SomeError: message`).
_EXCEPTION = re.compile(r"^(?P<name>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Group)): (?P<text>.*)$")

MAX_SAMPLES = 3


@attrs.define
class Occurrences:
    """How often one kind of line appeared, when first and last (exo's clock), examples."""

    count: int = 0
    first_at: str | None = None
    last_at: str | None = None
    samples: list[str] = attrs.field(factory=list)

    def add(self, at: str | None, line: str) -> None:
        self.count += 1
        self.first_at = self.first_at or at
        self.last_at = at or self.last_at
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(line[:300])

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class LogScan:
    """Everything learned from one exo process's log so far."""

    node_id: str
    master: str | None = None  # whom the last election result named
    results: int = 0  # election results
    campaigns: int = 0  # election rounds after the first
    logged_node_id: str | None = None  # the id the adapter loaded from the identity file
    gaps: dict[str, Occurrences] = attrs.field(factory=dict)  # "stream: reason" ->
    unrecoverable: dict[str, Occurrences] = attrs.field(factory=dict)
    duplicate_identity: Occurrences = attrs.field(factory=Occurrences)
    exceptions: dict[str, Occurrences] = attrs.field(factory=dict)  # exception name ->
    errors: Occurrences = attrs.field(factory=Occurrences)  # ERROR and CRITICAL records
    _at: str | None = None  # the time of the last record (traceback lines carry none)

    def feed(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip()
        record = _RECORD.match(line)
        message = line
        if record:
            self._at, message = record["time"], record["message"]
            if record["level"] in ("ERROR", "CRITICAL"):
                self.errors.add(self._at, message)
        if _SELF_MASTER.search(message):
            self.master, self.results = self.node_id, self.results + 1
        elif other := _OTHER_MASTER.search(message):
            self.master, self.results = other.group(1), self.results + 1
        elif _CAMPAIGN in message:
            self.campaigns += 1
        elif gap := _GAP.search(message):
            self._count(self.gaps, f"{gap['stream']}: {gap['reason']}", message)
        elif lost := _UNRECOVERABLE.search(message):
            self._count(self.unrecoverable, f"{lost['stream']}: {lost['reason']}", message)
        elif _DUPLICATE in message:
            self.duplicate_identity.add(self._at, message)
        elif loaded := _NODE_ID.search(message):
            self.logged_node_id = loaded.group(1)
        elif exc := _EXCEPTION.match(message.strip().lstrip("|+- ")):
            name = exc["name"].rsplit(".", 1)[-1]
            if not name.endswith("Group"):  # the groups only wrap what is counted already
                self._count(self.exceptions, name, exc.group(0))

    def _count(self, table: dict[str, Occurrences], key: str, line: str) -> None:
        table.setdefault(key, Occurrences()).add(self._at, line)

    def evidence(self) -> dict[str, Any]:
        """The failure evidence found (only the kinds that occurred)."""
        found: dict[str, Any] = {}
        for name, table in (
            ("gaps", self.gaps),
            ("unrecoverable", self.unrecoverable),
            ("exceptions", self.exceptions),
        ):
            if table:
                found[name] = {key: occ.to_json() for key, occ in sorted(table.items())}
        if self.duplicate_identity.count:
            found["duplicate_identity"] = self.duplicate_identity.to_json()
        if self.errors.count:
            found["errors"] = self.errors.to_json()
        return found


class LogTail:
    """A growing log file, read from where the last poll stopped."""

    def __init__(self, path: Path, node_id: str) -> None:
        self.path = path
        self.scan = LogScan(node_id)
        self._offset = 0
        self._partial = ""

    def poll(self) -> LogScan:
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except OSError:
            return self.scan
        self._offset += len(data)
        lines = (self._partial + data.decode(errors="replace")).split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next poll
        for line in lines:
            self.scan.feed(line)
        return self.scan

    def tail(self, lines: int = 15) -> list[str]:
        """The log's last lines (ANSI colours removed), for a report."""
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return []
        return [_ANSI.sub("", line)[:300] for line in text.splitlines()[-lines:]]


def merge_evidence(scans: list[LogScan]) -> dict[str, Any]:
    """Totals over several logs (a node's incarnations, or every node of a start)."""
    total: dict[str, Any] = {}
    for scan in scans:
        for kind, found in scan.evidence().items():
            if kind in ("duplicate_identity", "errors"):
                total[kind] = total.get(kind, 0) + found["count"]
            else:
                bucket = total.setdefault(kind, {})
                for key, occ in found.items():
                    bucket[key] = bucket.get(key, 0) + occ["count"]
    return total


def count_keys(evidence: dict[str, Any]) -> Counter[str]:
    """Flat counts: `gaps/election_messages: publisher could not repair` -> n."""
    flat: Counter[str] = Counter()
    for kind, found in evidence.items():
        if isinstance(found, dict):
            for key, count in found.items():
                flat[f"{kind}/{key}"] += count
        else:
            flat[kind] += found
    return flat
