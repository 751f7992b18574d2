"""Calls over the real server: signals relayed between two WebSocket clients,
and the ICE servers of ``--ice-server`` handed to the browser page."""

from __future__ import annotations

import json

import pytest

from chatcore_server.cli import _parser

from .conftest import JSON, http_get, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


async def test_a_call_is_relayed_between_two_clients_and_a_stranger_is_refused() -> None:
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
        ws_connect(f"{srv.ws}?user=carol&room=general", **JSON) as carol,
    ):
        for conn in (alice, bob, carol):
            await welcome(conn)
        await alice.send(json.dumps({"type": "call", "call": "k1", "to": "bob", "video": True}))
        await alice.send(json.dumps({"type": "offer", "call": "k1", "sdp": "v=0 offer"}))
        got = await recv_until(bob, lambda e: e["type"] == "offer")
        assert [e for e in got if e["type"] == "call"] == [
            {"type": "call", "call": "k1", "from": "alice", "video": True}
        ]
        await carol.send(json.dumps({"type": "answer", "call": "k1", "sdp": "v=0 evil"}))
        refused = await recv_until(carol, lambda e: e["type"] == "error")
        assert refused[-1]["code"] == "no_call"
        await bob.send(json.dumps({"type": "answer", "call": "k1", "sdp": "v=0 answer"}))
        got = await recv_until(alice, lambda e: e["type"] == "answer")
        assert got[-1] == {"type": "answer", "call": "k1", "from": "bob", "sdp": "v=0 answer"}
        await bob.send(json.dumps({"type": "hangup", "call": "k1"}))
        got = await recv_until(alice, lambda e: e["type"] == "ended")
        assert got[-1] == {"type": "ended", "call": "k1", "with": "bob", "reason": "hangup"}


async def test_the_page_learns_the_ice_servers_from_config_json() -> None:
    turn = {"urls": ["turn:turn.example.org:3478"], "username": "u", "credential": "p"}
    async with serving(ice_servers=[turn]) as srv:
        status, headers, body = await http_get(f"{srv.url}config.json")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"iceServers": [turn]}
    async with serving() as srv:
        _, _, body = await http_get(f"{srv.url}config.json")
        assert json.loads(body) == {"iceServers": []}


def test_ice_server_option() -> None:
    args = _parser().parse_args(
        [
            "serve",
            "--ice-server",
            "stun:stun.example.org:3478",
            "--ice-server",
            "turn:turn.example.org:3478?transport=udp,alice,s3cret",
        ]
    )
    assert args.ice_server == [
        {"urls": ["stun:stun.example.org:3478"]},
        {
            "urls": ["turn:turn.example.org:3478?transport=udp"],
            "username": "alice",
            "credential": "s3cret",
        },
    ]
    for bad in ("turn:turn.example.org:3478", "http://stun.example.org", "stun:x,only-user"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["serve", "--ice-server", bad])
