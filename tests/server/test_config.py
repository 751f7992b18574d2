"""``chatcore serve`` flags, ``--config FILE`` and ``--log-format json``, on real processes."""

from __future__ import annotations

import functools
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from chatcore_server._logjson import JsonFormatter
from chatcore_store import DurableStore, open_store

from .conftest import GUARD, JSON, http_get, kill, recv_until, welcome, ws_connect
from .test_metrics import Samples, scrape, value
from .test_shutdown import chatcore_serve

pytestmark = pytest.mark.anyio

OPERATOR_FLAGS = (
    "--max-connections",
    "--ping-interval",
    "--pong-timeout",
    "--grace",
    "--rate-burst",
    "--rate-per-second",
    "--request-burst",
    "--request-per-second",
    "--history-window",
    "--max-rooms-per-session",
    "--max-sessions-per-user",
    "--max-text-bytes",
    "--presence-batch-above",
    "--presence-interval",
    "--retention-interval",
    "--retain-messages",
    "--retain-days",
    "--log-format",
)


@functools.cache
def serve_help() -> str:
    """The options part of ``chatcore serve --help``, wrapped lines joined."""
    done = subprocess.run(
        [sys.executable, "-m", "chatcore_server", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    return " ".join(done.stdout.split("options:", 1)[1].split())


def described(flag: str) -> str:
    """What ``chatcore serve --help`` says of ``flag``."""
    return serve_help().split(f" {flag} ", 1)[1].split(" --", 1)[0]


def test_help_shows_every_limit_with_its_default() -> None:
    for flag in OPERATOR_FLAGS:
        assert "(default: " in described(flag), flag
    assert described("--history-window") == (
        "N messages per room kept in memory; a reader further behind is closed 1013 (default: 1000)"
    )
    assert described("--grace").endswith("(default: 30.0)")
    assert described("--config").startswith("FILE a TOML file of flags")


async def _grace_and_window_apply(url: str, window: int) -> None:
    """The grace period is half a second and the rooms keep ``window`` messages."""
    ws = url.replace("http", "ws", 1) + "ws"
    async with ws_connect(f"{ws}?user=alice&room=general", **JSON) as alice:
        await welcome(alice)
        for i in range(window + 5):
            await alice.send(json.dumps({"type": "send", "room": "general", "text": f"m{i}"}))
        await recv_until(alice, lambda e: e.get("type") == "ack" and e["offset"] == window + 5)
        samples: Samples = await scrape(url)
        assert value(samples, "chatcore_messages_in_memory") == window
        async with ws_connect(f"{ws}?user=bob&room=general", **JSON) as bob:
            await welcome(bob)
            await recv_until(alice, lambda e: e.get("type") == "joined")
            await kill(bob)
        # With the default 30 s grace period bob would still be there past the guard.
        with anyio.fail_after(3):
            await recv_until(
                alice, lambda e: e == {"type": "left", "room": "general", "user": "bob"}
            )


async def test_flags_set_the_grace_period_and_history_window() -> None:
    args = ("--db", "memory", "--grace", "0.5", "--history-window", "10", "--rate-burst", "50")
    async with chatcore_serve(*args) as (_, url):
        await _grace_and_window_apply(url, 10)


async def test_presence_flags_batch_a_room_above_their_size() -> None:
    # Above one user the room is crowded: bob's arrival reaches alice as a presence
    # frame 0.05 s later, not as a joined.
    args = ("--db", "memory", "--presence-batch-above", "1", "--presence-interval", "0.05")
    async with chatcore_serve(*args) as (_, url):
        ws = url.replace("http", "ws", 1) + "ws"
        async with ws_connect(f"{ws}?user=alice&room=general", **JSON) as alice:
            await welcome(alice)
            async with ws_connect(f"{ws}?user=bob&room=general", **JSON) as bob:
                await welcome(bob)
                seen = await recv_until(alice, lambda e: e.get("type") != "members")
                assert seen == [
                    {"type": "presence", "room": "general", "joins": ["bob"], "leaves": []}
                ]
    assert described("--presence-batch-above").endswith("(default: 50)")
    assert described("--presence-interval").endswith("(default: 0.5)")


async def test_a_config_file_sets_the_same_and_the_command_line_wins(tmp_path: Path) -> None:
    config = tmp_path / "chatcore.toml"
    config.write_text('db = "memory"\ngrace = 0.5\nhistory-window = 10\nrate-burst = 50\n')
    async with chatcore_serve("--config", str(config)) as (_, url):
        await _grace_and_window_apply(url, 10)
    async with chatcore_serve("--config", str(config), "--history-window", "7") as (_, url):
        await _grace_and_window_apply(url, 7)


async def test_retain_messages_from_a_config_file_cuts_the_stored_rooms(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    config = tmp_path / "chatcore.toml"
    config.write_text(
        f'db = "sqlite:///{db}"\nretain-messages = 2\nretention-interval = 0.05\nretain-days = 30\n'
    )
    async with chatcore_serve("--config", str(config)) as (_, url):
        ws = url.replace("http", "ws", 1) + "ws"
        async with ws_connect(f"{ws}?user=alice&room=general", **JSON) as alice:
            await welcome(alice)
            for i in range(5):
                await alice.send(json.dumps({"type": "send", "room": "general", "text": f"m{i}"}))
            await recv_until(alice, lambda e: e.get("type") == "ack" and e["offset"] == 5)
        store = open_store(f"sqlite:///{db}")
        assert isinstance(store, DurableStore)
        await store.open()
        try:
            with anyio.fail_after(GUARD):
                while [m.offset for m in await store.history("general")] != [4, 5]:
                    await anyio.sleep(0.05)
        finally:
            await store.close()
    assert described("--retain-messages").endswith("(default: None)")
    assert "for rooms without an age limit of their own" in described("--retain-days")


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("history-windw = 10\n", "unknown setting 'history-windw'"),
        ('history-window = "ten"\n', "history-window"),
        ("grace = true\n", "grace"),
        ('log-format = "xml"\n', "log-format"),
        ("history-window = 0\n", "--history-window must be a positive number"),
        ("presence-interval = 0\n", "--presence-interval must be a positive number"),
        ("presence-batch-above = -1\n", "--presence-batch-above must be a positive number"),
        ("grace = [\n", "--config"),
        ("retain-messages = -1\n", "--retain-messages must be 0 or more"),
        ("retain-days = 0\n", "--retain-days must be more than 0"),
    ],
)
def test_a_bad_config_file_is_refused_with_its_reason(
    tmp_path: Path, content: str, complaint: str
) -> None:
    config = tmp_path / "chatcore.toml"
    config.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "chatcore_server", "serve", "--port", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=GUARD,
        check=False,
    )
    assert done.returncode != 0
    assert complaint in done.stderr, done.stderr


async def test_json_logs_are_one_object_per_line() -> None:
    async with chatcore_serve("--db", "memory", "--log-format", "json") as (process, url):
        ws = url.replace("http", "ws", 1) + "ws"
        async with ws_connect(f"{ws}?user=alice&room=general", **JSON) as alice:
            await welcome(alice)
        status, _, _ = await http_get(url + "healthz")
        assert status == 200
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(GUARD):
            assert await process.wait() == 0
        assert process.stderr is not None
        log = ""
        with anyio.fail_after(GUARD):
            async for chunk in TextReceiveStream(process.stderr):
                log += chunk
    lines = [json.loads(line) for line in log.splitlines()]
    assert lines, log
    for line in lines:
        assert set(line) == {"time", "level", "logger", "message"}, line
        assert line["time"].endswith("+00:00")
    messages = [line["message"] for line in lines]
    assert any(m.startswith("opened conn=1 user=alice") for m in messages), messages
    assert any(m.startswith("closed conn=1 user=alice code=1000") for m in messages), messages
    assert "chatcore stopped" in messages


def test_json_log_lines_carry_the_traceback_on_one_line() -> None:
    record = logging.LogRecord(
        "chatcore_host", logging.CRITICAL, __file__, 1, "bug\nhere", (), None
    )
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "bug\nhere"
    assert parsed["level"] == "CRITICAL"
    assert parsed["logger"] == "chatcore_host"
    assert parsed["exc_info"].startswith("Traceback")
    assert "RuntimeError: boom" in parsed["exc_info"]


async def test_the_admin_token_comes_from_the_environment_and_help_never_shows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATCORE_ADMIN_TOKEN", "env-s3cret")
    done = subprocess.run(
        [sys.executable, "-m", "chatcore_server", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "env-s3cret" not in done.stdout
    async with chatcore_serve("--db", "memory") as (_, url):
        status, _, _ = await http_get(url + "admin/rooms", {"Authorization": "Bearer env-s3cret"})
        assert status == 200
        status, _, _ = await http_get(url + "admin/rooms", {"Authorization": "Bearer other"})
        assert status == 403
