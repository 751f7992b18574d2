"""What travels on the bus between processes sharing one log, as text.

The engine decides what to share (``Share``, ``SessionParked``) and learns
what others shared (``Appended`` with no ref, ``Shared``, ``SessionClaimed``);
this module is the one encoding of those values that every bus adapter uses,
so that processes built on different adapters understand each other. It also
names the channels: one per group room, one per user (direct messages and
their facts travel on the parties' user channels, so that a process that does
not hold a direct-message room yet still hears of it). Text that does not
not decode is a peer's fault: the decoders return None, never raise.

A presence fact's number (``seq``) travels as ``"n"``, left out when 0; a
process built before it ignores the key (and the digest, ``"k":"sum"``, whose
kind it does not know), and one built after reads a fact without it as
unnumbered.
"""

from __future__ import annotations

import json
from typing import Any

from ._commands import Appended, ParkedRoom, SessionClaimed, Shared
from ._effects import SessionParked
from ._events import Message
from ._facts import (
    Fact,
    MemberArrived,
    MemberDeparted,
    MemberMoved,
    MembersAsked,
    MembersDigest,
    MembersTold,
    ReadMarked,
    TypingChanged,
)
from ._names import dm_users, is_valid_name, is_valid_room

__all__ = [
    "bus_channels",
    "bus_fact",
    "bus_message",
    "parked_record",
    "parse_bus",
    "parse_parked",
    "user_channel",
]


def bus_channels(room: str) -> tuple[str, ...]:
    """The channels a message or fact of ``room`` is published on: the room's
    own, or for ``dm:a:b`` the two users' channels."""
    pair = dm_users(room)
    if pair is None:
        return (f"room:{room}",)
    return (user_channel(pair[0]), user_channel(pair[1]))


def user_channel(user: str) -> str:
    """The channel of ``user`` (subscribed on ``UserHeld``)."""
    return f"user:{user}"


def bus_message(message: Message) -> str:
    """A message the log stored, as published after the commit."""
    return json.dumps(
        {
            "m": [
                message.room,
                message.offset,
                message.epoch,
                message.sender,
                message.text,
                message.ts,
                message.client_id,
                message.deleted,
            ]
        },
        separators=(",", ":"),
    )


def bus_fact(origin: str, room: str, fact: Fact) -> str:
    """A ``Share`` effect's fact, sent by process ``origin``."""
    body: dict[str, Any]
    seq = 0
    match fact:
        case MemberArrived():
            body = {"k": "in", "u": fact.user}
            if fact.move:
                body["mv"] = fact.move
            seq = fact.seq
        case MemberDeparted():
            body = {"k": "out", "u": fact.user}
            seq = fact.seq
        case MemberMoved():
            body = {"k": "moved", "u": fact.user, "to": fact.to, "mv": fact.move, "l": fact.last}
            seq = fact.seq
        case TypingChanged():
            body = {"k": "typing", "u": fact.user, "a": fact.active}
        case ReadMarked():
            body = {"k": "read", "u": fact.user, "o": fact.offset}
        case MembersAsked():
            body = {"k": "ask"}
            if fact.of:
                body["of"] = fact.of
        case MembersTold():
            body = {"k": "here", "us": list(fact.users)}
            seq = fact.seq
        case MembersDigest():
            body = {"k": "sum", "n": fact.seq}
    if seq:
        body["n"] = seq
    return json.dumps({"f": body, "o": origin, "r": room}, separators=(",", ":"))


def parse_bus(text: str) -> Appended | Shared | None:
    """A bus payload as the command to feed the engine (None: not one of ours)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        if "m" in data:
            room, offset, epoch, sender, body, ts, client_id, deleted = data["m"]
            if not (
                isinstance(room, str)
                and is_valid_room(room)
                and _int(offset)
                and offset > 0
                and isinstance(epoch, str)
                and isinstance(sender, str)
                and isinstance(body, str)
                and _int(ts)
                and (client_id is None or isinstance(client_id, str))
                and isinstance(deleted, bool)
            ):
                return None
            message = Message(
                room=room,
                offset=offset,
                epoch=epoch,
                sender=sender,
                text=body,
                ts=ts,
                client_id=client_id,
                deleted=deleted,
            )
            return Appended(message=message)
        origin, room, body = data["o"], data["r"], data["f"]
        if not (isinstance(origin, str) and isinstance(room, str) and is_valid_room(room)):
            return None
        fact = _fact(body)
        return None if fact is None else Shared(origin=origin, room=room, fact=fact)
    except (KeyError, TypeError, ValueError):
        return None


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _user(value: object) -> str | None:
    return value if isinstance(value, str) and is_valid_name(value) else None


def _fact(body: Any) -> Fact | None:
    kind = body["k"]
    seq = body.get("n", 0)
    if not _int(seq) or seq < 0:
        return None
    if kind == "ask":
        of = body.get("of", "")
        return MembersAsked(of=of) if isinstance(of, str) else None
    if kind == "sum":
        return MembersDigest(seq=seq)
    if kind == "here":
        users = body["us"]
        if not isinstance(users, list) or any(_user(u) is None for u in users):
            return None
        return MembersTold(users=tuple(users), seq=seq)
    user = _user(body["u"])
    if user is None:
        return None
    if kind == "in":
        move = body.get("mv", "")
        return MemberArrived(user=user, move=move, seq=seq) if isinstance(move, str) else None
    if kind == "moved":
        to, move, last = body["to"], body["mv"], body["l"]
        if isinstance(to, str) and to and isinstance(move, str) and move and isinstance(last, bool):
            return MemberMoved(user=user, to=to, move=move, last=last, seq=seq)
        return None
    if kind == "out":
        return MemberDeparted(user=user, seq=seq)
    if kind == "typing" and isinstance(body["a"], bool):
        return TypingChanged(user=user, active=body["a"])
    if kind == "read" and _int(body["o"]) and body["o"] >= 0:
        return ReadMarked(user=user, offset=body["o"])
    return None


def parked_record(parked: SessionParked) -> str:
    """A ``SessionParked`` as the record to keep until ``parked.until``."""
    return json.dumps(
        {
            "id": parked.id,
            "t": parked.token,
            "u": parked.user,
            "r": [[p.room, p.offset, p.epoch, p.read] for p in parked.rooms],
            "m": parked.moves,
        },
        separators=(",", ":"),
    )


def parse_parked(ref: int, user: str, record: str) -> SessionClaimed | None:
    """The ``SessionClaimed`` answer for a record taken for ``ClaimSession(ref,
    user=user)``; None (answer ``ClaimRefused``) if it is not ``user``'s or not a record."""
    try:
        data = json.loads(record)
        if not isinstance(data, dict) or data["u"] != user:
            return None
        rooms = tuple(
            ParkedRoom(room=r, offset=o, epoch=e, read=d)
            for r, o, e, d in data["r"]
            if isinstance(r, str)
            and is_valid_room(r)
            and _int(o)
            and isinstance(e, str)
            and _int(d)
        )
        moves = data.get("m", 0)
        if not (isinstance(data["id"], str) and isinstance(data["t"], str) and _int(moves)):
            return None
        return SessionClaimed(
            ref=ref, id=data["id"], token=data["t"], user=user, rooms=rooms, moves=moves
        )
    except (KeyError, TypeError, ValueError):
        return None
