"""``/metrics`` and ``/readyz`` for any server that runs an :class:`EngineHost`.

:class:`ChatCollector` is a prometheus-client collector that reads the
engine's ``stats()`` and ``counters()``, the host's :class:`HostTally` and the
server's :class:`TransportTally` when it is scraped: nothing is counted twice
and no text is formatted by hand. Each server registers it on a registry of
its own (:func:`metrics_registry`), so two servers in one process do not
clash. :func:`metrics_page` and :func:`readiness` answer the two routes as
plain data (status, headers, body) that any HTTP layer can send.

Needs ``prometheus-client`` (the ``server`` extra); the host itself does not.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from chatcore import LoadRoom, RoomLoaded
from chatcore_store import StoreUnavailable

from ._host import EngineHost
from ._policy import Headers, bearer_token
from ._tally import LATENCY_BUCKETS, BusTally

__all__ = [
    "ChatCollector",
    "Page",
    "TransportTally",
    "metrics_page",
    "metrics_registry",
    "readiness",
]

READY_TIMEOUT = 2.0
"""Seconds the store has to answer the readiness probe."""
_PROBE_ROOM = "readyz"  # read, never created


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportTally:
    """What the server counts about its sockets, read at scrape time."""

    open: int
    """WebSocket connections open now."""
    opened: int
    """WebSocket connections accepted since start."""
    bytes_written: int
    """Bytes written to WebSocket connections since start: ``chatcore serve`` counts
    frames and their headers; an ASGI app, the UTF-8 text it handed to ``send``
    (the ASGI server adds each frame's 2 to 10 header bytes)."""
    refused: Mapping[str, int] = field(default_factory=dict)
    """Connections refused before the engine saw them, by reason
    (:data:`~chatcore_host._tally.TRANSPORT_REFUSALS`)."""


@dataclass(frozen=True, slots=True)
class Page:
    """An HTTP answer as data: status, headers (content type first) and body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class ChatCollector(Collector):
    """The ``chatcore_*`` metrics of one host and its transport, collected at scrape time."""

    def __init__(self, host: EngineHost, transport: Callable[[], TransportTally]) -> None:
        self._host = host
        self._transport = transport

    def collect(self) -> Iterator[Metric]:
        engine = self._host.engine
        stats = engine.stats()
        counters = engine.counters()
        tally = self._host.tally
        wire = self._transport()

        yield GaugeMetricFamily(
            "chatcore_connections", "WebSocket connections open now", value=wire.open
        )
        yield CounterMetricFamily(
            "chatcore_connections_opened",
            "WebSocket connections accepted since start",
            value=wire.opened,
        )
        sessions = GaugeMetricFamily(
            "chatcore_sessions",
            "Sessions held, by state: live (connected or connecting) or grace "
            "(dropped, waiting to be resumed)",
            labels=["state"],
        )
        grace = stats["sessions_detached"]
        sessions.add_metric(["live"], stats["sessions"] - grace)
        sessions.add_metric(["grace"], grace)
        yield sessions
        yield GaugeMetricFamily("chatcore_rooms", "Rooms held in memory", value=stats["rooms"])
        yield GaugeMetricFamily(
            "chatcore_messages_in_memory",
            "Messages held in the rooms' windows",
            value=stats["messages_in_memory"],
        )
        yield GaugeMetricFamily(
            "chatcore_store_pending",
            "Storage requests the engine waits for the store to answer",
            value=stats["pending_appends"] + stats["pending_loads"],
        )
        yield GaugeMetricFamily(
            "chatcore_screening_pending",
            "Messages awaiting the screen hook's verdict",
            value=stats["pending_screens"],
        )
        yield CounterMetricFamily(
            "chatcore_messages_appended",
            "Messages the log numbered and the engine published to their room",
            value=counters.messages_appended,
        )
        yield CounterMetricFamily(
            "chatcore_deliveries",
            "Frames handed to connections (one per recipient)",
            value=tally.deliveries,
        )
        yield CounterMetricFamily(
            "chatcore_written_bytes",
            "Bytes written to WebSocket connections",
            value=wire.bytes_written,
        )
        yield CounterMetricFamily(
            "chatcore_slow_consumer_closes",
            "Connections closed with 1013 for not reading fast enough",
            value=counters.slow_consumer_closes,
        )
        limited = CounterMetricFamily(
            "chatcore_rate_limited",
            "Requests refused with rate_limited, by limit: messages (chat rate), "
            "requests (request rate), pending (frames before the welcome), screening "
            "(too many messages awaiting the screen hook's verdict)",
            labels=["limit"],
        )
        for which in ("messages", "requests", "pending", "screening"):
            limited.add_metric([which], counters.rate_limited.get(which, 0))
        yield limited
        refusals = CounterMetricFamily(
            "chatcore_refusals",
            "Requests refused with an error event, by its code, and connections "
            "refused at connect, by reason (the engine's, and the server's before the "
            "engine saw them)",
            labels=["reason"],
        )
        reasons = dict(counters.refusals)
        for reason, count in wire.refused.items():
            reasons[reason] = reasons.get(reason, 0) + count
        for reason, count in sorted(reasons.items()):
            refusals.add_metric([reason], count)
        yield refusals
        resumes = CounterMetricFamily(
            "chatcore_resumes",
            "Connections that came with a resume token: resumed true (session taken "
            "up) or false (token unknown or expired: a fresh session)",
            labels=["resumed"],
        )
        resumes.add_metric(["true"], counters.resumes)
        resumes.add_metric(["false"], counters.resumes_failed)
        yield resumes
        yield CounterMetricFamily(
            "chatcore_gaps_given_up",
            "Missing offsets a room waited a whole window for, then skipped",
            value=counters.gaps_given_up,
        )
        cumulative: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), tally.store_counts, strict=True):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
        yield HistogramMetricFamily(
            "chatcore_store_latency_seconds",
            "Time the history store took per batch of storage effects",
            buckets=cumulative,
            sum_value=tally.store_sum,
        )
        yield CounterMetricFamily(
            "chatcore_store_failures",
            "Storage effects the store answered with a failure, and batches that raised",
            value=tally.store_failures,
        )
        if (bus := self._host.bus) is not None:
            yield from _bus_families(bus.tally)


def _bus_families(tally: BusTally) -> Iterator[Metric]:
    """The bus between processes (only when the host has one)."""
    yield CounterMetricFamily(
        "chatcore_bus_publishes",
        "Messages this process published to the bus (one per message, never per member)",
        value=tally.publishes,
    )
    yield CounterMetricFamily(
        "chatcore_bus_publish_failures",
        "Messages not published (the bus refused or timed out); they are in the log, "
        "and other processes catch up from it",
        value=tally.publish_failures,
    )
    yield CounterMetricFamily(
        "chatcore_bus_republished",
        "Messages whose publish failed and that were published again once the link worked",
        value=tally.republished,
    )
    yield CounterMetricFamily(
        "chatcore_bus_publishes_dropped",
        "Messages whose publish failed and that were given up (more were kept than "
        "the bounds); they are in the log",
        value=tally.publishes_dropped,
    )
    yield CounterMetricFamily(
        "chatcore_bus_received",
        "Messages other processes appended, received from the bus",
        value=tally.received,
    )
    yield CounterMetricFamily(
        "chatcore_bus_resyncs",
        "Times the bus subscription came back after it was lost; every held room is "
        "checked against the log each time",
        value=tally.resyncs,
    )
    yield CounterMetricFamily(
        "chatcore_bus_deaf",
        "Times the liveness probe found the subscription deaf (no echo) and reopened it",
        value=tally.deaf,
    )
    yield CounterMetricFamily(
        "chatcore_bus_facts",
        "Presence facts (arrivals, departures, typing, read marks, member lists) published",
        value=tally.facts,
    )
    yield CounterMetricFamily(
        "chatcore_bus_facts_received",
        "Presence facts from other processes fed to the engine",
        value=tally.facts_received,
    )
    claims = CounterMetricFamily(
        "chatcore_bus_claims",
        "Resumes of sessions parked in Redis, by outcome (refused: no record for that "
        "token and user, or Redis did not answer)",
        labels=["outcome"],
    )
    claims.add_metric(["claimed"], tally.claims)
    claims.add_metric(["refused"], tally.claims_refused)
    yield claims
    yield CounterMetricFamily(
        "chatcore_bus_processes_gone",
        "Other processes whose heartbeat expired; their members left",
        value=tally.processes_gone,
    )
    yield GaugeMetricFamily(
        "chatcore_bus_channels",
        "Channels (rooms, users) Redis confirmed subscribed now",
        value=tally.channels,
    )


def metrics_registry(
    host: EngineHost, transport: Callable[[], TransportTally]
) -> CollectorRegistry:
    """A registry of its own holding a :class:`ChatCollector` (never the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ChatCollector(host, transport))
    return registry


def metrics_page(registry: CollectorRegistry, headers: Headers, token: str | None) -> Page:
    """``/metrics``: the registry in the Prometheus text format.

    With ``token`` set, only a request with ``Authorization: Bearer TOKEN``
    gets it (401 otherwise); the token is never taken from the query string,
    where it would end up in access logs.
    """
    if token is not None:
        given = bearer_token(headers, ())
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            return _json(
                401,
                {"error": {"status": 401, "message": "a metrics token is required"}},
                ("www-authenticate", "Bearer"),
            )
    return Page(
        200,
        (("content-type", CONTENT_TYPE_LATEST), ("cache-control", "no-store")),
        generate_latest(registry),
    )


async def readiness(host: EngineHost, *, stopping: bool) -> Page:
    """``/readyz``: 200 when the history store answers a trivial read (and the bus,
    if there is one, is subscribed and answers a ping), else 503.

    The read is one room look-up, bounded by :data:`READY_TIMEOUT`.
    """
    if stopping:
        return _json(503, {"status": "stopping"}, ("retry-after", "5"))
    reason = await _store_problem(host)
    body = {"status": "ready", "store": reason or "ok"}
    if host.bus is not None:
        bus = "timed out"
        with anyio.move_on_after(READY_TIMEOUT):
            bus = await host.bus.ping() or "ok"
        body["bus"] = bus
    if body["store"] != "ok" or body.get("bus", "ok") != "ok":
        body["status"] = "unavailable"
        return _json(503, body, ("retry-after", "5"))
    return _json(200, body)


async def _store_problem(host: EngineHost) -> str | None:
    with anyio.move_on_after(READY_TIMEOUT):
        try:
            if (durable := host.durable) is not None:
                await durable.room(_PROBE_ROOM)
                return None
            answers = await host.query_store([LoadRoom(room=_PROBE_ROOM, recent=0)])
        except StoreUnavailable as exc:
            return exc.reason
        except Exception as exc:  # a failing store must turn the probe red, not crash it
            return type(exc).__name__
        if any(isinstance(a, RoomLoaded) for a in answers):
            return None
        return "no answer"
    return "timed out"


def _json(status: int, obj: object, *extra: tuple[str, str]) -> Page:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return Page(
        status, (("content-type", "application/json"), ("cache-control", "no-store"), *extra), body
    )
