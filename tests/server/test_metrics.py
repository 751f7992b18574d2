"""``/metrics``, ``/healthz`` and ``/readyz`` over real sockets.

Each test scrapes a running server, parses the text with prometheus-client's
own parser, and checks that the numbers moved by what the clients did.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatcore import Config
from chatcore_server import Limits
from chatcore_store import open_store

from .conftest import (
    GUARD,
    JSON,
    http_get,
    kill,
    recv,
    recv_until,
    serving,
    welcome,
    ws_connect,
)
from .test_slow import UNLIMITED, WINDOW, _flood_until_closed, _stalled_reader

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str, token: str | None = None) -> Samples:
    """``/metrics`` of the server at ``url``, parsed by prometheus-client."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, hdrs, body = await http_get(url + "metrics", headers)
    assert status == 200, body
    assert hdrs["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def send(room: str, text: str) -> str:
    return json.dumps({"type": "send", "room": room, "text": text})


async def test_written_bytes_count_every_frame_a_reader_got() -> None:
    """However a peer's queue is written (through its transport, or by the flush
    straight to its socket), ``chatcore_written_bytes_total`` counts the bytes."""
    async with (
        serving(config=Config(**UNLIMITED)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        await recv_until(alice, lambda e: e.get("user") == "bob")
        before = await scrape(srv.url)
        got = 0
        for i in range(10):
            await alice.send(send("general", f"m{i} " + "x" * 200))
            with anyio.fail_after(GUARD):
                frame = await bob.recv()
            assert json.loads(frame)["text"].startswith(f"m{i} ")
            got += len(frame.encode()) + 4  # (a frame of 126-65,535 bytes: a 4-byte header)
        after = await scrape(srv.url)
    written = value(after, "chatcore_written_bytes_total")
    # Alice's acks came on top of what bob got.
    assert written - value(before, "chatcore_written_bytes_total") > got


async def test_metrics_follow_messages_refusals_and_resumes() -> None:
    config = Config(grace_period=30, rate_burst=3, rate_per_second=0.01)
    async with (
        serving(config=config) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        await welcome(alice)
        async with ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob:
            token = (await welcome(bob))["resume"]
            await recv_until(alice, lambda e: e["type"] == "joined")
            before = await scrape(srv.url)
            assert value(before, "chatcore_connections") == 2
            assert value(before, "chatcore_sessions", state="live") == 2
            assert value(before, "chatcore_rooms") == 1

            for i in range(3):
                await alice.send(send("general", f"m{i}"))
            await recv_until(bob, lambda e: e.get("text") == "m2")
            await alice.send(send("general", "one too many"))
            await recv_until(alice, lambda e: e.get("code") == "rate_limited")
            await alice.send(send("elsewhere", "not a member"))
            await recv_until(alice, lambda e: e.get("code") == "not_member")
            await kill(bob)
        # Bob's session waits out its grace period; he resumes, a stranger's token fails.
        with anyio.fail_after(GUARD):
            while srv.server.connections != 1:
                await anyio.sleep(0.01)
        grace = await scrape(srv.url)
        assert value(grace, "chatcore_sessions", state="grace") == 1
        assert value(grace, "chatcore_sessions", state="live") == 1
        async with (
            ws_connect(f"{srv.ws}?user=bob&room=general&resume={token}", **JSON) as bob2,
            ws_connect(f"{srv.ws}?user=carol&room=general&resume=forged", **JSON) as carol,
        ):
            assert (await recv(bob2))["resumed"] is True
            assert (await recv(carol))["resumed"] is False
            after = await scrape(srv.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0)

    assert moved("chatcore_messages_appended_total") == 3
    # Each message went to both members (the sender's copy is an ack), plus the
    # refusals, the welcomes and member lists of the newcomers.
    assert moved("chatcore_deliveries_total") >= 3 * 2 + 2
    assert moved("chatcore_written_bytes_total") > 3 * len(send("general", "m0"))
    assert moved("chatcore_rate_limited_total", limit="messages") == 1
    assert moved("chatcore_rate_limited_total", limit="requests") == 0
    assert moved("chatcore_refusals_total", reason="rate_limited") == 1
    assert moved("chatcore_refusals_total", reason="not_member") == 1
    assert moved("chatcore_resumes_total", resumed="true") == 1
    assert moved("chatcore_resumes_total", resumed="false") == 1
    assert value(after, "chatcore_connections") == 3
    assert value(after, "chatcore_connections_opened_total") == 4
    assert value(after, "chatcore_sessions", state="grace") == 0
    # The memory store answered every append and room load, each one timed.
    count = value(after, "chatcore_store_latency_seconds_count")
    assert count - value(before, "chatcore_store_latency_seconds_count") >= 3
    assert value(after, "chatcore_store_latency_seconds_bucket", le="+Inf") == count
    assert value(after, "chatcore_store_latency_seconds_sum") > 0
    assert value(after, "chatcore_store_failures_total") == 0


async def test_deliveries_count_every_recipient_of_a_fan_out() -> None:
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
        ws_connect(f"{srv.ws}?user=carol&room=general", **JSON) as carol,
        ws_connect(f"{srv.ws}?user=dave&room=general", **JSON) as dave,
    ):
        for conn in (alice, bob, carol, dave):
            await welcome(conn)
        await recv_until(alice, lambda e: e.get("user") == "dave")
        before = await scrape(srv.url)
        for i in range(5):
            await alice.send(send("general", f"m{i}"))
        for reader in (bob, carol, dave):
            await recv_until(reader, lambda e: e.get("text") == "m4")
        acks: list[Any] = []
        await recv_until(alice, lambda e: e["type"] == "ack" and (acks.append(e) or len(acks) == 5))
        after = await scrape(srv.url)
    # Each message: one frame to each of the three readers, and the sender's ack.
    moved = value(after, "chatcore_deliveries_total") - value(before, "chatcore_deliveries_total")
    assert moved == 5 * 4


async def test_a_slow_consumer_close_is_counted() -> None:
    config = Config(outbox_bytes=256 * 1024, history_window=WINDOW, **UNLIMITED)
    async with (
        serving(config=config, limits=Limits(close_timeout=0.5)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", max_queue=None, **JSON) as alice,
    ):
        await welcome(alice)
        assert value(await scrape(srv.url), "chatcore_slow_consumer_closes_total") == 0
        slow, _ = await _stalled_reader(srv, alice)
        async with slow:
            with anyio.fail_after(GUARD * 2):
                await _flood_until_closed(srv, alice)
            assert value(await scrape(srv.url), "chatcore_slow_consumer_closes_total") == 1


async def test_store_failures_are_counted_and_readyz_turns_503(anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("the PostgreSQL store runs on asyncio only")
    # Nothing listens on port 1: every call into the store fails at once.
    store = open_store("postgresql://postgres@127.0.0.1:1/test")
    async with (
        serving(store=store) as srv,
        ws_connect(f"{srv.ws}?user=alice", **JSON) as alice,
    ):
        await welcome(alice)
        status, _, body = await http_get(srv.url + "readyz")
        assert status == 503, body
        assert json.loads(body)["status"] == "unavailable"
        status, _, _ = await http_get(srv.url + "healthz")  # the process still answers
        assert status == 200
        await alice.send(json.dumps({"type": "join", "room": "general"}))
        await recv_until(alice, lambda e: e.get("code") == "unavailable")
        samples = await scrape(srv.url)
        assert value(samples, "chatcore_store_failures_total") >= 1
        assert value(samples, "chatcore_refusals_total", reason="unavailable") == 1


@pytest.mark.parametrize("url", ["memory", "postgresql://postgres@127.0.0.1/test"])
async def test_readyz_is_200_when_the_store_answers(anyio_backend: str, url: str) -> None:
    if url.startswith("postgresql") and anyio_backend != "asyncio":
        pytest.skip("the PostgreSQL store runs on asyncio only")
    schema = f"test_readyz_{os.getpid()}_{secrets.token_hex(4)}"
    if url.startswith("postgresql"):
        # A schema of its own: the shared database's default one may be at another
        # version (another checkout's tests), which this test is not about.
        url = f"{url}?schema={schema}"
    try:
        async with serving(store=open_store(url)) as srv:
            status, hdrs, body = await http_get(srv.url + "readyz")
            assert (status, json.loads(body)) == (200, {"status": "ready", "store": "ok"})
            assert hdrs["cache-control"] == "no-store"
    finally:
        if url.startswith("postgresql"):
            import psycopg
            from psycopg import sql

            async with await psycopg.AsyncConnection.connect(
                url.split("?")[0], autocommit=True
            ) as db:
                await db.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


async def test_metrics_token_is_required_when_set() -> None:
    async with serving(metrics_token="s3cret") as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, hdrs, _ = await http_get(srv.url + "metrics", headers)
            assert status == 401, headers
            assert hdrs["www-authenticate"] == "Bearer"
        status, _, _ = await http_get(srv.url + "metrics?token=s3cret")
        assert status == 401  # never from the query string (it would be logged)
        assert value(await scrape(srv.url, token="s3cret"), "chatcore_connections") == 0


async def test_two_servers_in_one_process_keep_their_own_counts() -> None:
    async with serving() as one, serving() as two:
        async with ws_connect(f"{one.ws}?user=alice&room=general", **JSON) as alice:
            await welcome(alice)
            await alice.send(send("general", "hi"))
            await recv_until(alice, lambda e: e["type"] == "ack")
            first: Any = await scrape(one.url)
            second: Any = await scrape(two.url)
        assert value(first, "chatcore_messages_appended_total") == 1
        assert value(first, "chatcore_connections_opened_total") == 1
        assert value(second, "chatcore_messages_appended_total") == 0
        assert value(second, "chatcore_connections_opened_total") == 0


def _upgrade(query: str, *headers: str) -> bytes:
    lines = [
        f"GET /ws?{query} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_connections_refused_before_the_engine_are_counted_by_reason() -> None:
    from .conftest import raw_exchange
    from .test_tls_auth import SECRET, token

    bearer = f"Authorization: Bearer {token('alice')}"
    async with serving(jwt_secret=SECRET, limits=Limits(max_connections=1)) as srv:
        port = int(srv.url.rsplit(":", 1)[1].strip("/"))
        before = await scrape(srv.url)
        for reason in ("server_full", "origin_not_allowed", "unauthorized", "bad_query"):
            assert value(before, "chatcore_refusals_total", reason=reason) == 0
        cases = [
            (_upgrade("user=alice", "Origin: http://evil.example"), b" 403 "),
            (_upgrade("user=alice"), b" 401 "),  # no token
            (_upgrade("user=alice", "Authorization: Bearer forged"), b" 401 "),
            (_upgrade("room=bad%20name", bearer), b" 400 "),
            (_upgrade("user=alice", "Origin: http://a", "Origin: http://b"), b" 400 "),
            (b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b" 426 "),
            (b"\x16\x03\x01 not http\r\n\r\n", b" 400 "),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", b" 431 "),
        ]
        for request, status in cases:
            answer = await raw_exchange(port, request)
            assert status in answer.split(b"\r\n", 1)[0], (request[:60], answer[:80])
        # The one connection the server takes is held open: the next request is refused.
        async with await anyio.connect_tcp("127.0.0.1", port):
            with anyio.fail_after(GUARD):
                while srv.server._tcp < 1:
                    await anyio.sleep(0.01)
            answer = await raw_exchange(port, _upgrade("user=alice"))
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
        with anyio.fail_after(GUARD):
            while srv.server._tcp:
                await anyio.sleep(0.01)
        after = await scrape(srv.url)

    def refused(reason: str) -> float:
        return value(after, "chatcore_refusals_total", reason=reason)

    assert refused("origin_not_allowed") == 1
    assert refused("unauthorized") == 2
    assert refused("bad_handshake") == 2
    assert refused("malformed_request") == 1
    assert refused("request_too_large") == 1
    assert refused("bad_query") == 1
    assert refused("server_full") == 1
    assert refused("shutting_down") == 0
    # The engine never saw any of them.
    assert value(after, "chatcore_connections_opened_total") == 0
