"""What the host counts for metrics: deliveries, the store's latency and failures,
and (for the servers) the connections refused before the engine saw them.

Plain integers and a fixed-bucket histogram, no metrics library: the host runs
without one, and ``chatcore_host._metrics`` turns these into Prometheus
families at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from chatcore import AppendFailed, Command, HistoryFailed, InboxFailed, RoomLoadFailed

__all__ = ["LATENCY_BUCKETS", "TRANSPORT_REFUSALS", "BusTally", "HostTally", "RefusalTally"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds in seconds of the store latency histogram's buckets (``+Inf`` implied)."""

_FAILURES = (AppendFailed, HistoryFailed, InboxFailed, RoomLoadFailed)


class HostTally:
    """Running totals kept by an :class:`EngineHost`; read, never reset."""

    __slots__ = ("deliveries", "store_failures", "store_counts", "store_sum")

    def __init__(self) -> None:
        self.deliveries = 0
        """Frames handed to the transport, one per recipient."""
        self.store_failures = 0
        """Storage effects the store answered with a failure, and batches that raised."""
        self.store_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        """Store calls per latency bucket (not cumulative; the last is over every bound)."""
        self.store_sum = 0.0

    def store_call(self, seconds: float, answers: Sequence[Command]) -> None:
        """One call into the store took ``seconds`` and answered ``answers``."""
        self.store_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.store_sum += seconds
        for answer in answers:
            if isinstance(answer, _FAILURES):
                self.store_failures += 1


TRANSPORT_REFUSALS = (
    "server_full",
    "shutting_down",
    "origin_not_allowed",
    "unauthorized",
    "bad_handshake",
    "bad_query",
    "request_too_large",
    "malformed_request",
)
"""Reasons a server refuses a WebSocket connection before the engine sees it.

``server_full`` (503: at ``max_connections``), ``shutting_down`` (503),
``origin_not_allowed`` (403), ``unauthorized`` (401: token or ``identify``),
``bad_handshake`` (400/405/426: a repeated or invalid upgrade header, another
WebSocket version, a plain GET of ``/ws``), ``bad_query`` (400/414: the
connect query), ``request_too_large`` (431) and ``malformed_request`` (400:
not HTTP; ``chatcore serve`` only, an ASGI server answers those itself).
They join the engine's reasons in ``chatcore_refusals_total{reason}``.
"""


class RefusalTally:
    """Connections a server refused before the engine saw them, by reason."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(TRANSPORT_REFUSALS, 0)

    def count(self, reason: str) -> None:
        if reason not in self.counts:
            raise ValueError(f"not a transport refusal reason: {reason!r}")
        self.counts[reason] += 1


@dataclass(slots=True)
class BusTally:
    """What a bus between processes counts, for metrics; read, never reset."""

    publishes: int = 0
    """Messages published: one per message and channel (a room's one channel; the two
    users' channels of a direct message), never per member."""
    publish_failures: int = 0
    """Message publishes that failed (each once): the bus refused or timed out, they
    waited behind one that did, or the queue overflowed. All but the last are kept and
    go out later (``republished``) or are given up (``publishes_dropped``)."""
    republished: int = 0
    """Message publishes that failed and went out later, once the link worked again."""
    publishes_dropped: int = 0
    """Message publishes that failed and were given up: more were kept than the bounds."""
    received: int = 0
    """Messages from other processes fed to the engine."""
    facts: int = 0
    """Facts (presence, typing, read marks) published."""
    facts_received: int = 0
    """Facts from other processes fed to the engine."""
    claims: int = 0
    """Sessions parked by another process (or this one) and claimed here."""
    claims_refused: int = 0
    """Claims with no record for that token and user (or Redis did not answer)."""
    processes_gone: int = 0
    """Other processes whose heartbeat expired (fed to the engine as ``ProcessGone``)."""
    resyncs: int = 0
    """Times the subscription came back after it was lost (each a resync of every room)."""
    deaf: int = 0
    """Times the liveness probe found the subscription deaf and opened it again."""
    channels: int = 0
    """Channels (rooms, users) Redis confirmed subscribed right now (a gauge)."""
