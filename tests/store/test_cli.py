"""open_store URLs, the admin calls, and the command-line verbs run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatcore import Append, LoadRoom
from chatcore_store import MemoryStore, create_room, list_rooms, open_store
from chatcore_store.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_795_000_000_000  # 2026-11-18T11:06:40Z


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///chat.db", "chat.db"),
        ("sqlite:////var/lib/chat.db", "/var/lib/chat.db"),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
        ("some/dir/chat.db", "some/dir/chat.db"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    store = open_store(url)
    assert isinstance(store, SQLiteStore)
    assert store.path == path


def test_other_urls() -> None:
    assert isinstance(open_store("memory"), MemoryStore)
    pg = open_store("postgresql://u@127.0.0.1:5432/db?schema=chat_a&connect_timeout=3")
    assert (type(pg).__name__, getattr(pg, "schema", None)) == ("PostgresStore", "chat_a")
    assert getattr(pg, "conninfo", None) == "postgresql://u@127.0.0.1:5432/db?connect_timeout=3"
    for bad in ("mysql://x/y", "sqlite:", "sqlite://host/chat.db"):
        with pytest.raises(ValueError, match=r"URL|path"):
            open_store(bad)


async def test_admin_calls_on_a_durable_store(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "chat.db") as store:
        room = await create_room(store, "staff", allow=["alice", "bob"])
        assert room is not None
        assert (room.private, room.allow, room.head) == (True, frozenset({"alice", "bob"}), 0)
        await create_room(store, "lobby", private=False)
        rooms = await list_rooms(store)
        assert [(r.name, r.private) for r in rooms] == [("lobby", False), ("staff", True)]
        for name, allow in (("bad name", ["alice"]), ("ok", ["not ok"])):
            with pytest.raises(ValueError, match="invalid"):
                await create_room(store, name, allow=allow)


async def test_admin_calls_on_the_memory_store() -> None:
    store = MemoryStore()
    made = await create_room(store, "staff", allow=["alice"])
    [room] = await list_rooms(store)
    assert made == room
    assert (room.name, room.private, room.allow) == ("staff", True, frozenset({"alice"}))


def chatcore(*args: str, tz: str = "UTC") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TZ": tz}
    return subprocess.run(
        [sys.executable, "-m", "chatcore_store", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


async def test_rooms_and_history_from_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    made = chatcore("rooms", "create", "staff", "--private", "--allow", "alice,bob", "--db", url)
    assert made.returncode == 0, made.stderr
    async with open_store(url) as store:
        await store.execute([LoadRoom(room="lobby", recent=0)])
        await store.execute(
            [
                Append(ref=1, room="lobby", sender="alice", text="hi", ts=T0),
                Append(ref=2, room="lobby", sender="bob", text="two\nlines", ts=T0 + 61_000),
            ]
        )
    listing = chatcore("rooms", "list", "--db", url)
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert rows == [["lobby", "public", "2", "2", "-"], ["staff", "private", "0", "0", "alice,bob"]]

    utc = chatcore("history", "lobby", "--db", url, "--utc", tz="Asia/Kolkata")
    assert utc.returncode == 0, utc.stderr
    assert utc.stdout.splitlines() == [
        "     1  2026-11-18 11:06:40 +0000  alice: hi",
        "     2  2026-11-18 11:07:41 +0000  bob: two",
        "        lines",
    ]
    local = chatcore("history", "lobby", "--db", url, "--limit", "1", tz="Asia/Kolkata")
    assert local.stdout.splitlines()[0] == "     2  2026-11-18 16:37:41 +0530  bob: two"

    missing = chatcore("history", "nowhere", "--db", url)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no room nowhere" in missing.stderr
    down = chatcore("rooms", "list", "--db", f"sqlite:///{tmp_path / 'no' / 'such.db'}")
    assert down.returncode == 1
    assert "error:" in down.stderr


def test_the_chatcore_program_mounts_the_store_verbs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server_cli = pytest.importorskip("chatcore_server.cli", reason="the server adapter is absent")
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    assert server_cli.main(["rooms", "create", "ops", "--db", url]) == 0
    assert server_cli.main(["rooms", "list", "--db", url]) == 0
    assert "ops" in capsys.readouterr().out
