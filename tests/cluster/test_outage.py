"""Redis restarted under three ``chatcore serve`` processes mid-stream.

The processes use a Redis server of the test's own (never the machine's
shared one), which the test kills and starts again while members send. Sends
go on being stored and acked while Redis is down (PostgreSQL is the record);
the subscriptions come back by themselves; every live member ends with every
acked message of the others, once and in order; ``/readyz`` says 503 while
the bus is down and 200 after; the resyncs are counted in ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json

import anyio
import pytest

from .conftest import GUARD, Cluster, PrivateRedis, Server, clients, metric
from .conftest import http_get as get
from .test_messages import ROOM, stream

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.redis_outage,
]


async def ready(server: Server) -> tuple[int, dict[str, str]]:
    status, body = await anyio.to_thread.run_sync(get, server, "/readyz")
    return status, json.loads(body)


async def test_redis_restart_mid_stream_loses_nothing(
    cluster: Cluster, private_redis: PrivateRedis
) -> None:
    cluster.redis_url = private_redis.url
    servers = await cluster.start_many(3)
    users = [f"r{i}" for i in range(6)]
    urls = [servers[i % 3].ws(user, [ROOM]) for i, user in enumerate(users)]
    async with clients(urls) as members:
        for member in members:
            await member.until(lambda c: bool(c.of("members", ROOM)), "members")
        for server in servers:
            assert (await ready(server))[0] == 200
        acks: dict[str, int] = {}
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for member, user in zip(members, users, strict=True):
                tg.start_soon(stream, member, user, acks, stop)
            with anyio.fail_after(GUARD):
                while len(acks) < 30:
                    await anyio.sleep(0.01)
            await private_redis.stop()
            during = len(acks)
            with anyio.fail_after(GUARD):  # still stored and acked: the log is up
                while len(acks) < during + 30:
                    await anyio.sleep(0.01)
            status, body = await ready(servers[1])
            assert status == 503
            assert body["store"] == "ok"
            assert body["bus"] != "ok"
            await private_redis.start()
            after = len(acks)
            with anyio.fail_after(GUARD):
                while len(acks) < after + 30:
                    await anyio.sleep(0.01)
            stop.set()
        assert len(set(acks.values())) == len(acks)
        for member, user in zip(members, users, strict=True):
            others = {cid: off for cid, off in acks.items() if not cid.startswith(f"{user}-")}
            want = set(others.values())
            with contextlib.suppress(TimeoutError):
                await member.until(
                    lambda c, want=want: want <= {m["offset"] for m in c.messages(ROOM)},
                    "every acked message",
                )
            missing = want - {m["offset"] for m in member.messages(ROOM)}
            assert not missing, f"{user} never got {sorted(missing)}"
            got = [m["offset"] for m in member.messages(ROOM)]
            assert got == sorted(set(got)), "delivered twice or out of order"
    for server in servers:
        with anyio.fail_after(GUARD):
            while (await ready(server))[0] != 200:
                await anyio.sleep(0.1)
        _, text = await anyio.to_thread.run_sync(get, server, "/metrics")
        assert metric(text, "chatcore_bus_resyncs_total") >= 1
        assert metric(text, "chatcore_bus_publish_failures_total") >= 0
