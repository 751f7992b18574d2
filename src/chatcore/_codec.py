"""The wire protocol ``chatcore.v1``: decoding client frames, encoding events.

Pure functions, no state. ``docs/protocol.md`` is the normative description;
this module is its implementation. Decoding never raises anything but
:class:`FrameError`, whatever the input.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable
from dataclasses import replace
from json.scanner import make_scanner
from typing import Any, assert_never, cast

from ._commands import (
    CallSignal,
    ClaimDeviceKeys,
    ClientRequest,
    ConnId,
    FetchHistory,
    Join,
    Leave,
    MarkRead,
    Prekey,
    PublishDeviceKeys,
    Send,
    SendDirect,
    SignalKind,
    StartTyping,
)
from ._errors import ErrorCode
from ._events import (
    Ack,
    CallEvent,
    Deleted,
    ErrorEvent,
    History,
    Joined,
    KeysEvent,
    Left,
    Members,
    Message,
    Presence,
    ReadMark,
    Removed,
    ServerEvent,
    Typing,
    Welcome,
)
from ._names import is_valid_name

__all__ = [
    "MAX_CLIENT_ID",
    "FrameError",
    "decode_line",
    "decode_request",
    "encode_json",
    "encode_text",
    "event_to_dict",
    "format_ts",
]

MAX_CLIENT_ID = 128
"""Longest client message id, in characters."""

_MAX_OFFSET = 2**53 - 1  # what a JavaScript number holds exactly


class FrameError(Exception):
    """A client frame that cannot be turned into a request."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


def _field_str(obj: dict[str, Any], key: str, ref: str | None) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        what = "missing" if key not in obj else "must be a string"
        raise FrameError(ErrorCode.INVALID_FIELD, f"field {key!r} {what}", ref)
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
            raise FrameError(
                ErrorCode.INVALID_FIELD, f"field {key!r} is not valid Unicode", ref
            ) from None
    return value


def _field_int(obj: dict[str, Any], key: str, ref: str | None, *, low: int = 0) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_OFFSET:
        what = "missing" if key not in obj else f"must be an integer >= {low}"
        raise FrameError(ErrorCode.INVALID_FIELD, f"field {key!r} {what}", ref)
    return value


def _field_opt_int(obj: dict[str, Any], key: str, ref: str | None, *, low: int) -> int | None:
    return None if obj.get(key) is None else _field_int(obj, key, ref, low=low)


def _client_id(obj: dict[str, Any]) -> str | None:
    value = obj.get("id")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CLIENT_ID or not value.isprintable():
        raise FrameError(
            ErrorCode.INVALID_FIELD, f"field 'id' must be a string of 1-{MAX_CLIENT_ID} characters"
        )
    return value


# The scanner json.loads uses (typeshed has make_scanner take itself, not a decoder).
_scan_value: Callable[[str, int], tuple[Any, int]] = make_scanner(cast(Any, json.JSONDecoder()))


def _loads(text: str) -> Any:
    """``json.loads(text)``. A frame that is one object with nothing around it (what
    clients send) goes to the scanner straight: ``loads``' three Python layers, which
    look for a byte order mark and for whitespace around the value, cost as much as
    the scan of a chat message. Anything else, and any error, is ``loads``' own."""
    if text[:1] == "{" and text[-1:] == "}":
        try:
            obj, end = _scan_value(text, 0)
        except StopIteration:  # (cannot happen at "{": loads says why)
            return json.loads(text)
        if end == len(text):
            return obj
    return json.loads(text)


def decode_request(conn: ConnId, text: str) -> ClientRequest:
    """Decode one JSON text frame into a client request, or raise FrameError."""
    try:
        obj = _loads(text)
    except (ValueError, RecursionError):
        raise FrameError(ErrorCode.INVALID_JSON, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError(ErrorCode.INVALID_JSON, "frame must be a JSON object")
    kind = obj.get("type")
    if kind == "send":
        cid = _client_id(obj)
        ref = cid if cid is not None else _room_ref(obj)
        room = _field_str(obj, "room", ref)
        if "enc" in obj:
            return Send(
                conn=conn, room=room, text=_envelope(obj, ref), client_id=cid, encrypted=True
            )
        return Send(conn=conn, room=room, text=_field_str(obj, "text", ref), client_id=cid)
    if kind == "dm":
        cid = _client_id(obj)
        to = _field_str(obj, "to", cid)
        if "enc" in obj:
            return SendDirect(
                conn=conn, to=to, text=_envelope(obj, cid), client_id=cid, encrypted=True
            )
        return SendDirect(conn=conn, to=to, text=_field_str(obj, "text", cid), client_id=cid)
    if kind == "publish_keys":
        return _decode_publish(conn, obj)
    if kind == "claim_keys":
        return ClaimDeviceKeys(conn=conn, user=_field_str(obj, "user", None))
    if kind == "join":
        return Join(conn=conn, room=_field_str(obj, "room", None))
    if kind == "leave":
        return Leave(conn=conn, room=_field_str(obj, "room", None))
    if kind == "typing":
        return StartTyping(conn=conn, room=_field_str(obj, "room", None))
    if kind == "read":
        room = _field_str(obj, "room", None)
        return MarkRead(conn=conn, room=room, offset=_field_int(obj, "offset", room))
    if kind == "history":
        room = _field_str(obj, "room", None)
        before = _field_opt_int(obj, "before", room, low=1)
        limit = _field_opt_int(obj, "limit", room, low=1)
        return FetchHistory(
            conn=conn, room=room, before=before, limit=50 if limit is None else limit
        )
    if isinstance(kind, str) and kind in _SIGNALS:
        return _decode_signal(conn, _SIGNALS[kind], obj)
    if not isinstance(kind, str):
        raise FrameError(
            ErrorCode.UNKNOWN_TYPE, "field 'type' missing or not a string", _room_ref(obj)
        )
    raise FrameError(ErrorCode.UNKNOWN_TYPE, f"unknown type {kind[:40]!r}", _room_ref(obj))


# -- end-to-end encryption (section 11): shapes only; the contents stay opaque ---------

ENCRYPTED = "\x01e2e:"  # _keys.ENCRYPTED (the codec imports nothing that imports it)
_MAX_KEY = 256  # characters of one base64 key, nonce or id
_MAX_DEVICES = 32  # payloads in one envelope
_PAYLOAD_FIELDS = {"prekey_id": int, "ephemeral": str, "iv": str, "ct": str}


def _short_str(value: object, what: str, ref: str | None, limit: int = _MAX_KEY) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isascii():
        raise FrameError(ErrorCode.INVALID_FIELD, f"{what} must be 1-{limit} ASCII characters", ref)
    return value


def _envelope(obj: dict[str, Any], ref: str | None) -> str:
    """The ``enc`` object, checked for shape and re-encoded: the stored body."""
    enc = obj["enc"]
    if "text" in obj:
        raise FrameError(ErrorCode.INVALID_FIELD, "a message has 'text' or 'enc', not both", ref)
    if not isinstance(enc, dict) or enc.get("v") != 1:
        raise FrameError(ErrorCode.INVALID_FIELD, "field 'enc' must be an object with v 1", ref)
    if set(enc) - {"v", "from_device", "identity", "payloads"}:
        raise FrameError(ErrorCode.INVALID_FIELD, "unknown field in 'enc'", ref)
    device = enc.get("from_device")
    if not isinstance(device, str) or not is_valid_name(device):
        raise FrameError(ErrorCode.INVALID_FIELD, "enc.from_device must be a device name", ref)
    payloads = enc.get("payloads")
    if not isinstance(payloads, dict) or not 0 < len(payloads) <= _MAX_DEVICES:
        raise FrameError(
            ErrorCode.INVALID_FIELD, f"enc.payloads must be an object of 1-{_MAX_DEVICES}", ref
        )
    clean: dict[str, Any] = {"v": 1, "from_device": device}
    if "identity" in enc:
        clean["identity"] = _short_str(enc["identity"], "enc.identity", ref)
    out: dict[str, dict[str, Any]] = {}
    for name, payload in payloads.items():
        if not is_valid_name(name) or not isinstance(payload, dict):
            raise FrameError(ErrorCode.INVALID_FIELD, "enc.payloads: device name -> object", ref)
        one: dict[str, Any] = {}
        for key, value in payload.items():
            kind = _PAYLOAD_FIELDS.get(key)
            if kind is None:
                raise FrameError(ErrorCode.INVALID_FIELD, "unknown field in a payload", ref)
            if kind is int:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int)
                    or not 0 <= value <= _MAX_OFFSET
                ):
                    raise FrameError(ErrorCode.INVALID_FIELD, "prekey_id must be an integer", ref)
                one[key] = value
            else:
                # A ciphertext's bound is the engine's size check on the whole body.
                limit = 4 * 1024 * 1024 if key == "ct" else _MAX_KEY
                one[key] = _short_str(value, f"payload {key}", ref, limit)
        if "iv" not in one or "ct" not in one:
            raise FrameError(ErrorCode.INVALID_FIELD, "a payload needs 'iv' and 'ct'", ref)
        out[name] = one
    clean["payloads"] = out
    return ENCRYPTED + json.dumps(clean, separators=(",", ":"))


def _decode_publish(conn: ConnId, obj: dict[str, Any]) -> PublishDeviceKeys:
    device = _field_str(obj, "device", None)
    if not is_valid_name(device):
        raise FrameError(ErrorCode.INVALID_NAME, "field 'device' must be a name", device[:64])
    identity = _short_str(obj.get("identity"), "field 'identity'", device)
    raw = obj.get("prekeys", [])
    if not isinstance(raw, list):
        raise FrameError(ErrorCode.INVALID_FIELD, "field 'prekeys' must be a list", device)
    prekeys = []
    for item in raw:
        if not isinstance(item, dict):
            raise FrameError(ErrorCode.INVALID_FIELD, "a prekey is an object", device)
        prekeys.append(
            Prekey(
                id=_field_int(item, "id", device),
                key=_short_str(item.get("key"), "a prekey's key", device),
            )
        )
    if len({p.id for p in prekeys}) != len(prekeys):
        raise FrameError(ErrorCode.INVALID_FIELD, "prekey ids must differ", device)
    return PublishDeviceKeys(conn=conn, device=device, identity=identity, prekeys=tuple(prekeys))


def _keys_obj(event: KeysEvent) -> dict[str, Any]:
    if event.kind == "keys":
        return {
            "type": "keys",
            "user": event.user,
            "devices": [
                {
                    "device": device,
                    "identity": identity,
                    "prekey": None if pid is None else {"id": pid, "key": key},
                }
                for device, identity, pid, key in event.devices
            ],
        }
    return {"type": event.kind, "device": event.device, "prekeys": event.prekeys}


def _room_ref(obj: dict[str, Any]) -> str | None:
    """What an error names when the request has no client id: its room, if any
    (protocol.md section 5: the id, else the room name, else null)."""
    room = obj.get("room")
    return room if isinstance(room, str) else None


_SIGNALS = {kind.value: kind for kind in SignalKind}
_MAX_MLINE = 65535


def _decode_signal(conn: ConnId, kind: SignalKind, obj: dict[str, Any]) -> CallSignal:
    """A call frame (section 8). Its ``ref`` is the call id."""
    call = _field_str(obj, "call", None)
    ref = call[:64]
    match kind:
        case SignalKind.CALL:
            video = obj.get("video", False)
            if not isinstance(video, bool):
                raise FrameError(ErrorCode.INVALID_FIELD, "field 'video' must be a boolean", ref)
            to = _field_str(obj, "to", ref)
            return CallSignal(conn=conn, call=call, kind=kind, to=to, video=video)
        case SignalKind.OFFER | SignalKind.ANSWER:
            return CallSignal(conn=conn, call=call, kind=kind, sdp=_field_str(obj, "sdp", ref))
        case SignalKind.CANDIDATE:
            mid = obj.get("mid")
            if mid is not None:
                mid = _field_str(obj, "mid", ref)
            index = _field_opt_int(obj, "index", ref, low=0)
            if index is not None and index > _MAX_MLINE:
                raise FrameError(ErrorCode.INVALID_FIELD, "field 'index' out of range", ref)
            return CallSignal(
                conn=conn,
                call=call,
                kind=kind,
                candidate=_field_str(obj, "candidate", ref),
                mid=mid,
                index=index,
            )
        case _:
            return CallSignal(conn=conn, call=call, kind=kind)


def _call_obj(event: CallEvent) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": event.kind, "call": event.call}
    match event.kind:
        case "call":
            obj["from"] = event.user
            obj["video"] = event.video
        case "ringing":
            obj["to"] = event.user
        case "offer" | "answer":
            obj["from"] = event.user
            obj["sdp"] = event.sdp
        case "candidate":
            obj["from"] = event.user
            obj["candidate"] = event.candidate
            obj["mid"] = event.mid
            obj["index"] = event.index
        case _:  # ended
            obj["with"] = event.user
            obj["reason"] = event.reason
    return obj


def decode_line(text: str) -> str:
    """A plain-text-mode frame as message text: without one trailing line ending
    (``\n``, ``\r\n`` or ``\r``), which line-based clients such as websocat send."""
    if text.endswith("\n"):
        return text[:-2] if text.endswith("\r\n") else text[:-1]
    return text[:-1] if text.endswith("\r") else text


def format_ts(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC, e.g. ``2026-11-21T22:00:00.000Z``."""
    seconds, millis = divmod(ms, 1000)
    return _second_text(seconds) + _MILLIS[millis]


_MILLIS = tuple(f"{millis:03d}Z" for millis in range(1000))
"""Each ``000Z`` to ``999Z``: formatting three digits cost as much as the rest of a stamp."""


@functools.lru_cache(maxsize=4)
def _second_text(seconds: int) -> str:
    """``2026-11-21T22:00:00.`` for ``seconds``. Every chat message is stamped and a
    busy room's fall in the same second: strftime once per second cost more than
    the rest of encoding a message."""
    t = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}."


def _message_obj(m: Message) -> dict[str, Any]:
    if not m.deleted and m.text.startswith(ENCRYPTED):  # deleted: shown deleted, never enc
        return _encrypted_obj(m)
    obj = {
        "type": "message",
        "room": m.room,
        "offset": m.offset,
        "epoch": m.epoch,
        "from": m.sender,
        "text": m.text,
        "ts": format_ts(m.ts),
        "id": m.client_id,
    }
    if m.deleted:  # only then: every other message frame stays as it was
        obj["deleted"] = True
    return obj


def _encrypted_obj(m: Message) -> dict[str, Any]:
    """An encrypted message: ``enc`` carries the envelope, ``text`` is empty."""
    try:
        enc = json.loads(m.text[len(ENCRYPTED) :])
    except ValueError:  # not written by this codec: shown as it is
        enc = None
    obj = {
        "type": "message",
        "room": m.room,
        "offset": m.offset,
        "epoch": m.epoch,
        "from": m.sender,
        "text": "" if enc is not None else m.text,
        "ts": format_ts(m.ts),
        "id": m.client_id,
    }
    if enc is not None:
        obj["enc"] = enc
    return obj


def event_to_dict(event: ServerEvent) -> dict[str, Any]:
    """The JSON object of ``event`` before serialising (for JSON APIs over HTTP)."""
    match event:
        case Message():
            return _message_obj(event)
        case Welcome():
            return {
                "type": "welcome",
                "session": event.session,
                "resume": event.resume,
                "user": event.user,
                "resumed": event.resumed,
                "rooms": {
                    r: (
                        {"offset": p.offset, "epoch": p.epoch, "read": p.read, "reset": True}
                        if p.reset
                        else {"offset": p.offset, "epoch": p.epoch, "read": p.read}
                    )
                    for r, p in event.rooms.items()
                },
            }
        case Ack():
            return {
                "type": "ack",
                "room": event.room,
                "offset": event.offset,
                "epoch": event.epoch,
                "id": event.client_id,
            }
        case Joined():
            return {"type": "joined", "room": event.room, "user": event.user}
        case Left():
            return {"type": "left", "room": event.room, "user": event.user}
        case Presence():
            return {
                "type": "presence",
                "room": event.room,
                "joins": list(event.joins),
                "leaves": list(event.leaves),
            }
        case Members():
            return {
                "type": "members",
                "room": event.room,
                "users": list(event.users),
                "offset": event.offset,
                "epoch": event.epoch,
            }
        case Typing():
            return {
                "type": "typing",
                "room": event.room,
                "user": event.user,
                "active": event.active,
            }
        case ReadMark():
            return {"type": "read", "room": event.room, "user": event.user, "offset": event.offset}
        case History():
            return {
                "type": "history",
                "room": event.room,
                "messages": [_message_obj(m) for m in event.messages],
                "more": event.more,
            }
        case ErrorEvent():
            obj: dict[str, Any] = {
                "type": "error",
                "code": event.code,
                "message": event.message,
                "ref": event.ref,
            }
            if event.retry_after is not None:
                obj["retry_after"] = event.retry_after
            return obj
        case CallEvent():
            return _call_obj(event)
        case KeysEvent():
            return _keys_obj(event)
        case Deleted():
            return {"type": "deleted", "room": event.room, "offset": event.offset}
        case Removed():
            return {"type": "removed", "room": event.room, "reason": event.reason}
        case _:
            assert_never(event)


# json.dumps with any option builds a new encoder per call; this one is built once
# (an encoder keeps no state between calls).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_json(event: ServerEvent) -> str:
    """The ``chatcore.v1`` text frame for ``event``."""
    if type(event) is Message:
        if not event.deleted and not event.text.startswith(ENCRYPTED):
            return _message_json(event)
    elif type(event) is Ack:
        return _ack_json(event)
    return _ENCODER.encode(event_to_dict(event))


_json_string = json.encoder.encode_basestring  # what _ENCODER uses for every str


def _message_json(m: Message) -> str:
    """:func:`encode_json` of a plain chat message, written out without a dict.

    Every chat message is encoded once per mode when it fans out; building its
    dict and walking it with the encoder were 11% of the server's samples
    (py-spy, 100 members, 300,000 deliveries/s). The same keys in the same
    order, each string through the encoder's own escaping, so the bytes are
    those of ``_message_obj`` (a property test compares the two).
    """
    cid = m.client_id
    return (
        f'{{"type":"message","room":{_json_string(m.room)},"offset":{m.offset:d},'
        f'"epoch":{_json_string(m.epoch)},"from":{_json_string(m.sender)},'
        f'"text":{_json_string(m.text)},"ts":"{format_ts(m.ts)}",'
        f'"id":{"null" if cid is None else _json_string(cid)}}}'
    )


def encode_string(text: str) -> str:
    """``text`` as a JSON string, encoded as :func:`encode_json` encodes strings."""
    return _ENCODER.encode(text)


def _ack_json(a: Ack) -> str:
    """:func:`encode_json` of an ack, written out as :func:`_message_json` is (one
    per message sent: its sender's)."""
    cid = a.client_id
    return (
        f'{{"type":"ack","room":{_json_string(a.room)},"offset":{a.offset:d},'
        f'"epoch":{_json_string(a.epoch)},"id":{"null" if cid is None else _json_string(cid)}}}'
    )


_NO_USERS = '"users":[]'


def members_shell(event: Members) -> tuple[str, str]:
    """:func:`encode_json` of ``event`` cut around its users: the frame is the first
    part, the JSON strings of ``event.users`` joined with commas, then the second.

    The parts depend only on the room, offset and epoch, so a room keeps them
    while its members come and go, and a crowd's list is joined, not encoded,
    per join.
    """
    frame = encode_json(replace(event, users=()))
    # Every string value in the frame is JSON-escaped, so the key is the only match.
    head, _, tail = frame.partition(_NO_USERS)
    return f'{head}"users":[', f"]{tail}"


def encode_members(event: Members, users: str) -> str:
    """:func:`encode_json` of ``event``, given its users already encoded: the JSON
    strings of ``event.users`` joined with commas."""
    head, tail = members_shell(event)
    return f"{head}{users}{tail}"


_NAMES_SHOWN = 5


def _some(users: tuple[str, ...]) -> str:
    """Users named on one plain-text line: a crowd's are counted, not listed."""
    if len(users) <= _NAMES_SHOWN:
        return ", ".join(users)
    return f"{', '.join(users[:_NAMES_SHOWN])} and {len(users) - _NAMES_SHOWN} more"


def _shown(m: Message) -> str:
    """What plain-text mode shows of a message: never an envelope's bytes."""
    if m.deleted:
        return "(message deleted)"
    return "[encrypted message]" if m.text.startswith(ENCRYPTED) else m.text


def encode_text(event: ServerEvent) -> str | None:
    """The plain-text-mode line for ``event``, or None if that mode shows nothing."""
    match event:
        case Message():
            return f"{event.sender}: {_shown(event)}"
        case Joined():
            return f"{event.user} joined the room"
        case Left():
            return f"{event.user} left the room"
        case Presence():
            said = [f"{_some(event.joins)} joined the room"] if event.joins else []
            if event.leaves:
                said.append(f"{_some(event.leaves)} left the room")
            return "\n".join(said) or None
        case Members():
            return "In the room: " + ", ".join(event.users)
        case ErrorEvent():
            return f"error: {event.message}"
        case History():
            lines = (f"{m.sender}: {_shown(m)}" for m in event.messages)
            return "\n".join(lines) or None
        case Deleted():
            return f"a message was deleted (offset {event.offset})"
        case Removed():
            where = "the server" if event.room is None else f"room {event.room}"
            return f"you were removed from {where}" + (f": {event.reason}" if event.reason else "")
        case Welcome() | Ack() | Typing() | ReadMark() | CallEvent() | KeysEvent():
            return None
        case _:
            assert_never(event)
