"""The key directory and encrypted direct messages, as clients see them (protocol.md section 11).

The engine is driven through the simulator and the real codec; the store is the
memory store (the SQL stores' claims are tested in tests/store/test_prekeys.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore import Config, DeleteMessage, Mode, Screen, Screened, dm_room
from chatcore_sim import SimClient, Simulation

ROOM = dm_room("alice", "bob")


def publish(client: SimClient, device: str, ids: range, identity: str = "IK") -> None:
    client.send_json(
        {
            "type": "publish_keys",
            "device": device,
            "identity": f"{identity}-{device}",
            "prekeys": [{"id": i, "key": f"PK{i}"} for i in ids],
        }
    )


def claim(client: SimClient, user: str) -> dict[str, Any]:
    client.send_json({"type": "claim_keys", "user": user})
    return client.of_type("keys")[-1]


def envelope(device: str = "phone", **payload: Any) -> dict[str, Any]:
    one = {"prekey_id": 1, "ephemeral": "EPH", "iv": "IV", "ct": "CIPHERTEXT"} | payload
    return {"v": 1, "from_device": device, "identity": "IK-a", "payloads": {"laptop": one}}


def errors(client: SimClient) -> list[tuple[str, str]]:
    return [(e["code"], e["message"]) for e in client.of_type("error")]


def test_each_prekey_is_handed_out_once_then_none_is_left() -> None:
    sim = Simulation(seed=1)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    publish(bob, "laptop", range(1, 4))
    assert bob.of_type("keys_published") == [
        {"type": "keys_published", "device": "laptop", "prekeys": 3}
    ]
    taken = [claim(alice, "bob")["devices"][0]["prekey"] for _ in range(4)]
    assert taken == [
        {"id": 1, "key": "PK1"},
        {"id": 2, "key": "PK2"},
        {"id": 3, "key": "PK3"},
        None,
    ]
    assert claim(alice, "bob")["devices"] == [
        {"device": "laptop", "identity": "IK-laptop", "prekey": None}
    ]


def test_a_claim_lists_every_device_with_one_prekey_each() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice")
    bob_laptop, bob_phone = sim.connect("bob"), sim.connect("bob")
    publish(bob_laptop, "laptop", range(1, 3))
    publish(bob_phone, "phone", range(10, 12))
    keys = claim(alice, "bob")
    assert keys["user"] == "bob"
    assert keys["devices"] == [
        {"device": "laptop", "identity": "IK-laptop", "prekey": {"id": 1, "key": "PK1"}},
        {"device": "phone", "identity": "IK-phone", "prekey": {"id": 10, "key": "PK10"}},
    ]
    assert claim(alice, "nobody")["devices"] == []


def test_low_stock_is_told_to_every_session_of_the_owner_only() -> None:
    sim = Simulation(Config(prekeys_low=2), seed=1)
    alice = sim.connect("alice")
    tab1, tab2 = sim.connect("bob"), sim.connect("bob")
    publish(tab1, "laptop", range(1, 4))
    claim(alice, "bob")  # 2 left: not low yet
    assert tab1.of_type("keys_low") == []
    claim(alice, "bob")  # 1 left
    low = {"type": "keys_low", "device": "laptop", "prekeys": 1}
    assert tab1.of_type("keys_low") == [low]
    assert tab2.of_type("keys_low") == [low]
    assert alice.of_type("keys_low") == []
    publish(tab1, "laptop", range(4, 20))  # restocked: more prekeys, same identity
    assert tab1.of_type("keys_published")[-1]["prekeys"] == 17


def test_a_new_identity_key_drops_the_old_prekeys() -> None:
    sim = Simulation(seed=1)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    publish(bob, "laptop", range(1, 4))
    publish(bob, "laptop", range(7, 8), identity="NEW")
    assert bob.of_type("keys_published")[-1]["prekeys"] == 1
    keys = claim(alice, "bob")["devices"]
    assert keys == [
        {"device": "laptop", "identity": "NEW-laptop", "prekey": {"id": 7, "key": "PK7"}}
    ]


def test_devices_and_prekeys_are_bounded() -> None:
    sim = Simulation(Config(max_devices_per_user=2, max_prekeys_per_device=5), seed=1)
    bob = sim.connect("bob")
    publish(bob, "d1", range(1, 6))
    publish(bob, "d2", range(1, 2))
    publish(bob, "d3", range(1, 2))
    assert errors(bob) == [("forbidden", "keys: too many devices")]
    publish(bob, "d1", range(6, 7))  # the stock would be 6
    assert errors(bob)[-1] == ("forbidden", "keys: too many prekeys in stock")
    publish(bob, "d2", range(1, 7))  # 6 at once
    assert errors(bob)[-1] == ("too_large", "more than 5 prekeys")
    assert [e["ref"] for e in bob.of_type("error")] == ["d3", "d1", "d2"]


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "publish_keys", "device": "bad name!", "identity": "K"},
        {"type": "publish_keys", "device": "d", "identity": ""},
        {"type": "publish_keys", "device": "d", "identity": "K", "prekeys": {"id": 1}},
        {
            "type": "publish_keys",
            "device": "d",
            "identity": "K",
            "prekeys": [{"id": -1, "key": "k"}],
        },
        {"type": "publish_keys", "device": "d", "identity": "K", "prekeys": [{"id": 1}]},
        {
            "type": "publish_keys",
            "device": "d",
            "identity": "K",
            "prekeys": [{"id": 1, "key": "a"}, {"id": 1, "key": "b"}],
        },
        {"type": "publish_keys", "device": "d", "identity": "K" * 300},
        {"type": "claim_keys"},
        {"type": "claim_keys", "user": "no such name!"},
    ],
)
def test_a_bad_key_request_is_an_error_for_that_client_alone(frame: dict[str, Any]) -> None:
    sim = Simulation(seed=1)
    bob, carol = sim.connect("bob", room="general"), sim.connect("carol", room="general")
    bob.send_json(frame)
    assert len(bob.of_type("error")) == 1
    assert bob.closed is None
    bob.send("still here")
    assert carol.texts() == ["still here"]


def test_an_encrypted_dm_is_relayed_stored_and_replayed_as_it_came() -> None:
    sim = Simulation(seed=1)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    enc = envelope()
    alice.send_json({"type": "dm", "to": "bob", "enc": enc, "id": "m1"})
    (got,) = bob.messages(ROOM)
    assert got["enc"] == enc
    assert got["text"] == ""
    assert (got["offset"], got["from"], got["id"]) == (1, "alice", "m1")
    assert alice.of_type("ack") == [
        {"type": "ack", "room": ROOM, "offset": 1, "epoch": got["epoch"], "id": "m1"}
    ]
    # A retry with the same id is the same message; a send in the room works too.
    alice.send_json({"type": "dm", "to": "bob", "enc": enc, "id": "m1"})
    alice.send_json({"type": "send", "room": ROOM, "enc": envelope(ct="TWO"), "id": "m2"})
    assert [m["offset"] for m in bob.messages(ROOM)] == [1, 2]
    assert [a["offset"] for a in alice.of_type("ack")] == [1, 1, 2]
    # History gives back the envelope, not a string that holds it.
    later = sim.connect("bob")
    later.history(ROOM)
    (page,) = later.of_type("history")
    assert [m["enc"]["payloads"]["laptop"]["ct"] for m in page["messages"]] == ["CIPHERTEXT", "TWO"]
    # The stored body is the envelope as the codec re-encoded it: no field a peer
    # added survives, and the server adds none.
    assert sim.store.messages(ROOM)[0].text.startswith("\x01e2e:{")


def test_an_encrypted_message_survives_a_resume() -> None:
    sim = Simulation(seed=1)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    alice.dm("bob", "plain first")
    sim.drop(bob)
    alice.send_json({"type": "dm", "to": "bob", "enc": envelope(ct="WHILE-AWAY")})
    sim.resume(bob)
    assert [
        m.get("enc", {}).get("payloads", {}).get("laptop", {}).get("ct") for m in bob.messages()
    ] == [
        None,
        "WHILE-AWAY",
    ]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"enc": "not an object"}, "invalid_field"),
        (
            {"enc": {"v": 2, "from_device": "d", "payloads": {"x": {"iv": "i", "ct": "c"}}}},
            "invalid_field",
        ),
        ({"enc": {"v": 1, "from_device": "d", "payloads": {}}}, "invalid_field"),
        ({"enc": {"v": 1, "from_device": "d", "payloads": {"x": {"iv": "i"}}}}, "invalid_field"),
        (
            {
                "enc": {
                    "v": 1,
                    "from_device": "d",
                    "payloads": {"x": {"iv": "i", "ct": "c", "pt": "p"}},
                }
            },
            "invalid_field",
        ),
        (
            {
                "enc": {
                    "v": 1,
                    "from_device": "d",
                    "payloads": {"x": {"iv": "i", "ct": "c"}},
                    "text": "leak",
                }
            },
            "invalid_field",
        ),
        (
            {"enc": {"v": 1, "from_device": "d", "payloads": {"x": {"iv": 1, "ct": "c"}}}},
            "invalid_field",
        ),
        (
            {
                "enc": {
                    "v": 1,
                    "from_device": "d",
                    "payloads": {"x": {"iv": "i", "ct": "c", "prekey_id": True}},
                }
            },
            "invalid_field",
        ),
        ({"enc": envelope(), "text": "both"}, "invalid_field"),
        ({"text": "\x01e2e:{}"}, "invalid_field"),
        ({"enc": envelope(ct="x" * 70_000)}, "too_large"),
    ],
)
def test_a_bad_envelope_is_refused_and_nothing_is_stored(change: dict[str, Any], code: str) -> None:
    sim = Simulation(Config(max_frame_bytes=200_000), seed=1)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    alice.send_json({"type": "dm", "to": "bob", **change, "id": "bad"})
    assert [e["code"] for e in alice.of_type("error")] == [code]
    assert bob.messages() == []
    assert sim.store.messages(ROOM) == []


def test_ciphertext_goes_to_direct_message_rooms_only() -> None:
    sim = Simulation(seed=1)
    alice, bob = sim.connect("alice", room="general"), sim.connect("bob", room="general")
    alice.send_json({"type": "send", "room": "general", "enc": envelope(), "id": "e"})
    assert errors(alice) == [("forbidden", "encrypted messages only in direct-message rooms")]
    assert bob.messages() == []


def test_plain_text_mode_shows_that_a_message_is_encrypted_not_its_bytes() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice")
    bob = sim.connect("bob", room=ROOM, mode=Mode.TEXT)
    alice.send_json({"type": "dm", "to": "bob", "enc": envelope()})
    assert bob.lines()[-1] == "alice: [encrypted message]"


def test_an_answer_for_a_session_that_ended_is_dropped_but_the_owner_still_hears_low_stock() -> (
    None
):
    sim = Simulation(Config(prekeys_low=5), seed=1, store_latency=1.0)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    sim.advance(2)
    publish(bob, "laptop", range(1, 3))
    sim.advance(2)
    alice.send_json({"type": "claim_keys", "user": "bob"})
    sim.close(alice)
    sim.advance(2)
    assert bob.of_type("keys_low") == [{"type": "keys_low", "device": "laptop", "prekeys": 1}]
    assert sim.engine.stats()["pending_loads"] == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Mostly well formed, with one thing or another wrong: the cases that reach the store.
payload_fields = st.fixed_dictionaries(
    {"iv": st.sampled_from(["IV"] * 4 + ["", 5]), "ct": st.sampled_from(["CT"] * 4 + ["\u00e9"])},
    optional={
        "prekey_id": st.sampled_from([1] * 4 + [-1, True, 2**60, "1"]),
        "ephemeral": st.sampled_from(["E"] * 4 + [None]),
        "other": json_values,
    },
)
envelopes = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1] * 4 + [2, "1", None]),
        "from_device": st.sampled_from(["d"] * 4 + ["", "bad name", 3]),
        "payloads": st.dictionaries(
            st.sampled_from(["laptop", "phone", "x y"]), payload_fields, min_size=1, max_size=3
        ),
    },
    optional={"identity": st.sampled_from(["IK", "", 7]), "extra": json_values},
)


@settings(max_examples=300, deadline=None)
@given(enc=envelopes | json_values)
def test_any_envelope_is_stored_as_validated_or_refused_with_an_error(enc: Any) -> None:
    """Invariant: whatever `enc` holds, the sender gets an ack or a documented error,
    the connection stays open, and what the recipient reads has only known fields."""
    sim = Simulation(seed=1)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    alice.send_json({"type": "dm", "to": "bob", "enc": enc, "id": "x"})
    assert alice.closed is None
    answers = [e["type"] for e in alice.take() if e["type"] in ("ack", "error")]
    assert answers in (["ack"], ["error"])
    for e in alice.of_type("error"):
        assert e["code"] in ("invalid_field", "too_large")
    for m in bob.messages():
        assert set(m["enc"]) <= {"v", "from_device", "identity", "payloads"}
        for payload in m["enc"]["payloads"].values():
            assert set(payload) <= {"prekey_id", "ephemeral", "iv", "ct"}


def test_a_screening_hook_never_sees_ciphertext_and_cannot_alter_it() -> None:
    seen: list[str] = []

    def hook(screen: Screen) -> Screened:  # a filter that would mangle any text it saw
        seen.append(screen.text)
        return screen.replace("****")

    sim = Simulation(seed=1, screen=hook)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    enc = envelope()
    alice.send_json({"type": "dm", "to": "bob", "enc": enc, "id": "m1"})
    alice.send_json({"type": "dm", "to": "bob", "text": "plain", "id": "m2"})
    assert [m.get("enc") for m in bob.messages(ROOM)] == [enc, None]
    assert [m["text"] for m in bob.messages(ROOM)] == ["", "****"]
    assert seen == ["plain"]  # a plain direct message is still screened


def test_a_deleted_encrypted_message_reads_as_deleted_with_no_envelope_left() -> None:
    sim = Simulation(seed=1)
    alice, bob = sim.connect("alice"), sim.connect("bob")
    alice.send_json({"type": "dm", "to": "bob", "enc": envelope(), "id": "m1"})
    sim.feed(DeleteMessage(room=ROOM, offset=1))
    assert bob.of_type("deleted") == [{"type": "deleted", "room": ROOM, "offset": 1}]
    later = sim.connect("bob")
    later.history(ROOM)
    [page] = later.of_type("history")
    [m] = page["messages"]
    assert (m["text"], m.get("deleted"), "enc" in m) == ("", True, False)
    assert sim.store.messages(ROOM)[0].text == ""
