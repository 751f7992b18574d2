"""Records and replays: every command and effect survives the codec, and a
recorded run replays to the same effects, byte for byte, on a fresh engine."""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from chatcore import (
    Command,
    Config,
    Connect,
    Effect,
    Mode,
    RecordError,
    ServerEvent,
    decode,
    decode_command,
    encode,
    replay,
)
from chatcore_sim import Simulation

# -- the codec, for every type of the unions -------------------------------------------


def sample(hint: Any, n: int = 0) -> Any:
    """A value of type ``hint`` that differs from the field defaults."""
    origin = get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in get_args(hint) if a is not type(None)]
        return sample(options[n % len(options)], n)
    if origin is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return (sample(args[0], n), sample(args[0], n + 1))
        return tuple(sample(a, n + i) for i, a in enumerate(args))
    if origin is frozenset:
        return frozenset({sample(get_args(hint)[0], n), sample(get_args(hint)[0], n + 1)})
    if origin is not None and issubclass(origin, Mapping):
        return {f"k{n}": sample(get_args(hint)[1], n)}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = get_type_hints(hint)
        return hint(
            **{f.name: sample(hints[f.name], n + i) for i, f in enumerate(dataclasses.fields(hint))}
        )
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        members = list(hint)
        return members[-1 - n % len(members)]
    if hint is bool:
        return n % 2 == 0
    if hint is int:
        return 7 + n
    if hint is float:
        return 1.25 + n
    if hint is str:
        return f"s{n}é"
    raise AssertionError(f"no sample for {hint!r}: teach the test (and the codec) this type")


ALL_TYPES = [
    *[(t, Command) for t in get_args(Command)],
    *[(t, Effect) for t in get_args(Effect)],
    *[(t, ServerEvent) for t in get_args(ServerEvent)],
]


@pytest.mark.parametrize(("kind", "union"), ALL_TYPES, ids=[t.__name__ for t, _ in ALL_TYPES])
def test_every_command_effect_and_event_round_trips(kind: type, union: Any) -> None:
    for n in range(3):  # n varies which arm of each optional/union field is filled
        value = sample(kind, n)
        data = json.loads(json.dumps(encode(value)))
        assert decode(data, union) == value
        assert type(decode(data, union)) is kind


def test_frozensets_encode_the_same_whatever_the_order() -> None:
    from chatcore import CreateRoom

    a = CreateRoom(room="r", allow=frozenset(["zed", "amy", "bob"]))
    assert encode(a)["allow"] == ["amy", "bob", "zed"]


def test_a_command_from_a_record_keeps_its_types() -> None:
    command = Connect(conn=3, user="amy", rooms=("a", "b"), offsets={"a": 4}, mode=Mode.TEXT)
    assert decode_command(json.loads(json.dumps(encode(command)))) == command
    with pytest.raises(RecordError):
        decode_command({"type": "Nope"})


# -- a recorded run replays identically ----------------------------------------------------


def busy_run(config: Config | None = None) -> list[str]:
    """A simulated session with joins, sends, a drop and a resume, a slow reader,
    typing, history, a DM and a grace period running out; its record."""
    lines: list[str] = []
    sim = Simulation(config, seed=5, record=lines.append, store_latency=0.05)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", rooms=["general", "games"])
    carol = sim.connect("carol", room="general")
    sim.advance(0.2)
    alice.send("hello", id="a1")
    bob.typing()
    sim.advance(0.1)
    bob.send("hi alice", id="b1")
    carol.stop_reading()
    for i in range(40):
        alice.send(f"burst {i}", id=f"a-burst-{i}")
        sim.advance(0.15)
    sim.drop(bob)
    alice.send("while bob is away", id="a2")
    sim.advance(1)
    sim.resume(bob)
    sim.advance(0.5)
    carol.start_reading()
    bob.history(limit=5)
    alice.dm("bob", "psst", id="dm1")
    sim.advance(1)
    sim.drop(carol)
    sim.advance(60)  # carol's grace period runs out; pings and pongs go on
    alice.send("bye", id="a3")
    sim.advance(1)
    sim.shutdown()
    sim.advance(1)
    return lines


def test_a_simulated_run_replays_identically() -> None:
    lines = busy_run()
    assert len(lines) > 100
    assert replay(lines) is None


def test_the_record_is_the_same_run_after_run() -> None:
    assert busy_run() == busy_run()


def test_a_changed_default_is_reported_at_the_first_step_it_changes() -> None:
    lines = busy_run()
    divergence = replay(lines, override={"grace_period": 1.0})
    assert divergence is not None
    # The first place a shorter grace period shows: a tick that expires a dropped session.
    assert divergence.command is None
    assert "step" in str(divergence)
    assert "tick" in str(divergence)


def test_a_tampered_effect_is_named() -> None:
    lines = busy_run()
    step = next(i for i, line in enumerate(lines) if i > 0 and json.loads(line)["fx"])
    data = json.loads(lines[step])
    data["fx"][0] = "0" * 16
    lines[step] = json.dumps(data)
    divergence = replay(lines)
    assert divergence is not None
    assert divergence.step == data["n"]
    assert divergence.index == 0
    assert divergence.actual is not None
    assert "effect #0" in str(divergence)


def test_ids_that_are_not_in_the_record_are_a_divergence() -> None:
    lines = busy_run()
    step = next(i for i, line in enumerate(lines) if '"ids"' in line)
    data = json.loads(lines[step])
    del data["ids"]
    lines[step] = json.dumps(data)
    divergence = replay(lines)
    assert divergence is not None
    assert "id" in divergence.reason


def test_a_missing_step_or_header_is_a_broken_record() -> None:
    lines = busy_run()
    with pytest.raises(RecordError, match="missing"):
        replay(lines[:10] + lines[11:])
    with pytest.raises(RecordError, match="header"):
        replay(lines[1:])


def test_a_record_cut_mid_line_replays_up_to_the_cut() -> None:
    lines = busy_run()
    cut = [*lines[:50], lines[50][:20]]
    assert replay(cut) is None


# -- what a broken or doctored record is told -------------------------------------------


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        ({"type": "Nope"}, Connect | None),  # a union member that does not exist
        ("x", int | None),  # no member of the union takes it
        ("x", tuple[int, ...]),  # not a list
        ([1, 2, 3], tuple[int, int]),  # the wrong length
        ("x", frozenset[str]),
        ([], Mapping[str, int]),
        (True, int),  # a bool is not an int in a record
        ("x", float),
        ({"type": "Join"}, Connect),  # a dataclass of another type
    ],
)
def test_data_of_the_wrong_shape_is_a_record_error(data: Any, hint: Any) -> None:
    with pytest.raises(RecordError):
        decode(data, hint)


def test_plain_values_decode_as_their_hints() -> None:
    assert isinstance(decode(3, float), float)
    assert decode(3, float) == 3.0
    assert decode(None, int | None) is None
    assert decode("x", Any) == "x"
    assert decode(["a", "b"], frozenset[str]) == frozenset({"a", "b"})
    assert decode({"a": 1}, Mapping[str, int]) == {"a": 1}
    assert decode([1, "a"], tuple[int, str]) == (1, "a")


def test_a_header_that_is_not_one_is_refused() -> None:
    lines = busy_run()
    with pytest.raises(RecordError, match="not JSON"):
        replay(["not json", *lines[1:]])
    header = json.loads(lines[0])
    header["chatcore_record"] = 999
    with pytest.raises(RecordError, match="version"):
        replay([json.dumps(header), *lines[1:]])


def test_a_bad_line_before_the_end_is_a_broken_record() -> None:
    lines = busy_run()
    with pytest.raises(RecordError, match="not JSON"):
        replay([*lines[:20], "{cut", *lines[20:]])


def test_every_kind_of_divergence_is_named() -> None:
    lines = busy_run()
    step = next(i for i, line in enumerate(lines) if i > 0 and len(json.loads(line)["fx"]) > 1)
    data = json.loads(lines[step])
    fewer = dict(data, fx=data["fx"][:-1])  # the replay makes one more than recorded
    more = dict(data, fx=[*data["fx"], "0" * 16])  # the replay makes one fewer
    raised = dict(data, raised="ValueError")
    del raised["fx"]
    for doctored, reason in (
        (fewer, "an effect more"),
        (more, "an effect fewer"),
        (raised, "recorded engine raised"),
    ):
        divergence = replay([*lines[:step], json.dumps(doctored), *lines[step + 1 :]])
        assert divergence is not None, reason
        assert reason in divergence.reason
        assert "step" in str(divergence)
    extra = next(i for i, line in enumerate(lines) if '"ids"' in line)
    data = json.loads(lines[extra])
    data["ids"] = [*data["ids"], data["ids"][0]]
    divergence = replay([*lines[:extra], json.dumps(data), *lines[extra + 1 :]])
    assert divergence is not None
    assert "fewer ids" in divergence.reason
