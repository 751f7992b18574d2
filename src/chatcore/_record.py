"""Records of an engine's run, and replaying them: pure, stdlib only.

A record is JSON lines. The first line is a header holding the full
:class:`Config`; then one line per engine call, in order: the command (or a
tick) with its ``now``, the ids the engine drew from its :class:`IdSource`
during that call, and a short digest of each effect it returned (the
effects themselves are not kept: they are recomputed on replay, and their
digests compared byte for byte). :class:`Recorder` makes the lines,
:func:`replay` checks them against a fresh engine. Writing the lines to a
file (and rotating it) is the host's business, not this module's.

Call signals are never recorded: the SDP and ICE candidate of a call frame
are written as a filler of the same sizes (:func:`redact_command`), and the
``Deliver`` that relays one is digested as if it carried the filler
(:func:`effect_digest`), so the record replays identically without them.

The codec (:func:`encode`, :func:`decode`) is generic over the frozen
dataclasses of commands, effects and events, so a new command needs no code
here; ``tests/core/test_record.py`` round-trips every type of the unions.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from ._codec import encode_json
from ._commands import CallSignal, Command, ConnId, Mode, Receive
from ._config import Config
from ._effects import Deliver, Effect
from ._engine import Engine
from ._events import CallEvent, ServerEvent
from ._ids import IdSource

__all__ = [
    "RECORD_VERSION",
    "Divergence",
    "RecordError",
    "Recorder",
    "decode",
    "decode_command",
    "effect_digest",
    "encode",
    "read_header",
    "redact_command",
    "replay",
]

RECORD_VERSION = 2
"""2: call signals are redacted (version 1 recorded them)."""

Json = Any


class RecordError(ValueError):
    """The record cannot be replayed: not a record, a line missing, its start rotated away."""


# -- the codec ------------------------------------------------------------------------


def _dataclasses(union: object) -> dict[str, type]:
    return {t.__name__: t for t in get_args(union) if isinstance(t, type)}


_KNOWN: dict[str, type] = {
    **_dataclasses(Command),
    **_dataclasses(Effect),
    **_dataclasses(ServerEvent),
}
_HINTS: dict[type, dict[str, Any]] = {}
_FIELDS: dict[type, tuple[str, ...]] = {}
_PLAIN = frozenset({str, int, float, bool, type(None)})  # exactly these: an enum is not plain


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    return hints


def encode(value: object) -> Json:
    """A command, effect or event (or any value inside one) as JSON-ready data.

    Dataclasses become objects tagged with ``"type"``, tuples lists,
    frozensets sorted lists, enums their value: the same value always gives
    the same JSON, whatever the process's hash seed.
    """
    if type(value) in _PLAIN:
        return value
    if isinstance(value, enum.Enum):
        return value.value
    names = _FIELDS.get(type(value))
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELDS[type(value)] = tuple(f.name for f in dataclasses.fields(value))
    if names is not None:
        out: dict[str, Json] = {"type": type(value).__name__}
        for name in names:
            v = getattr(value, name)
            out[name] = v if type(v) in _PLAIN else encode(v)
        return out
    if isinstance(value, tuple | list):
        return [v if type(v) in _PLAIN else encode(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(encode(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    raise TypeError(f"cannot encode {type(value).__name__} in a record")


def decode(data: Json, hint: Any) -> Any:
    """The value of type ``hint`` that :func:`encode` turned into ``data``."""
    if hint is Any or hint is object:
        return data
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = get_args(hint)
        if data is None and type(None) in args:
            return None
        if isinstance(data, dict) and "type" in data:
            for arg in args:
                if isinstance(arg, type) and arg.__name__ == data["type"]:
                    return _decode_dataclass(data, arg)
            raise RecordError(f"{data['type']!r} is not one of {hint}")
        for arg in args:
            if arg is not type(None):
                try:
                    return decode(data, arg)
                except (RecordError, TypeError, ValueError):
                    continue
        raise RecordError(f"{data!r} is not a {hint}")
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(data, list):
            raise RecordError(f"expected a list for {hint}, got {data!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(v, args[0]) for v in data)
        if len(args) != len(data):
            raise RecordError(f"expected {len(args)} items for {hint}, got {data!r}")
        return tuple(decode(v, a) for v, a in zip(data, args, strict=True))
    if origin is frozenset or origin is set:
        (arg,) = get_args(hint)
        if not isinstance(data, list):
            raise RecordError(f"expected a list for {hint}, got {data!r}")
        return frozenset(decode(v, arg) for v in data)
    if origin in (dict, Mapping, typing.Mapping) or (
        isinstance(origin, type) and issubclass(origin, Mapping)
    ):
        _, arg = get_args(hint)
        if not isinstance(data, dict):
            raise RecordError(f"expected an object for {hint}, got {data!r}")
        return {k: decode(v, arg) for k, v in data.items()}
    if isinstance(hint, type):
        if dataclasses.is_dataclass(hint):
            return _decode_dataclass(data, hint)
        if issubclass(hint, enum.Enum):
            return hint(data)
        if hint is float and isinstance(data, int) and not isinstance(data, bool):
            return float(data)
        if hint is int and isinstance(data, bool):
            raise RecordError(f"expected an int, got {data!r}")
        if isinstance(data, hint):
            return data
    raise RecordError(f"{data!r} is not a {hint}")


def _decode_dataclass(data: Json, cls: type) -> Any:
    if not isinstance(data, dict) or data.get("type") != cls.__name__:
        raise RecordError(f"expected a {cls.__name__}, got {data!r}")
    hints = _hints(cls)
    kwargs = {
        f.name: decode(data[f.name], hints[f.name])
        for f in dataclasses.fields(cls)
        if f.name in data
    }
    return cls(**kwargs)


def decode_command(data: Json) -> Command:
    """A command from its :func:`encode` form."""
    if not isinstance(data, dict) or data.get("type") not in _KNOWN:
        raise RecordError(f"not a command: {data!r}")
    command: Command = decode(data, Command)
    return command


def _dumps(data: Json) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def effect_digest(effect: Effect) -> str:
    """A short digest of an effect's canonical JSON: equal effects, equal digests.

    A ``Deliver`` is digested by its recipients and its frame (``data`` is the
    event, encoded): the bytes the clients get, without encoding them twice.
    One that relays a call signal is digested with the signal's SDP or
    candidate replaced by :func:`filler`, as the record holds it: the same
    digest for the signal and for its filler.
    """
    if type(effect) is Deliver:
        assert isinstance(effect, Deliver)
        data = effect.data
        event = effect.event
        if type(event) is CallEvent and (event.sdp or event.candidate):
            data = encode_json(_redact_event(event))
        raw = f"Deliver|{effect.to}|{effect.size}|{data}".encode("utf-8", "surrogatepass")
    else:
        raw = _dumps(encode(effect)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


# -- call signals stay out of the record -------------------------------------------------


_SIGNAL_TYPES = frozenset({"offer", "answer", "candidate"})
"""The call frames that carry a payload (``sdp``, or ``candidate``)."""
_PAYLOADS = frozenset({"sdp", "candidate"})
_TWO_CHAR_ESCAPES = frozenset('"\\\b\f\n\r\t')
_JSON_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


def _stand_in(c: str) -> str:
    """One character of the same UTF-8 length, and as long in JSON, as ``c``."""
    n = ord(c)
    if c in _TWO_CHAR_ESCAPES:
        return "\n"  # 1 byte; escaped in two characters, as '"' or a tab is
    if n < 0x20:
        return "\x01"  # 1 byte; escaped in six (\u0001), as every other control is
    if n < 0x80:
        return "x"
    if 0xD800 <= n < 0xE000:
        return "\ud800"  # a lone surrogate stays one: the codec refuses it the same way
    if n < 0x800:
        return "\u00e9"
    if n < 0x10000:
        return "\ufffd"
    return "\U00010000"


def filler(text: str) -> str:
    """What a record holds instead of ``text`` (an SDP, an ICE candidate).

    Every character becomes a fixed one of its class: the same number of
    characters, the same UTF-8 length, the same length once encoded as JSON
    (as the codec encodes it), and empty stays empty. So size limits, outbox
    accounting and every decision the engine makes about the signal come out
    the same for the filler; only the content is gone. ``filler(filler(t))``
    is ``filler(t)``.
    """
    redacted = text.translate(_ASCII_STAND_INS)
    if redacted.isascii():
        return redacted
    return _NON_ASCII.sub(lambda m: _stand_in(m.group()), redacted)


_ASCII_STAND_INS = {i: _stand_in(chr(i)) for i in range(128)}
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _redact_event(event: CallEvent) -> CallEvent:
    return dataclasses.replace(
        event,
        sdp=None if event.sdp is None else filler(event.sdp),
        candidate=None if event.candidate is None else filler(event.candidate),
    )


def redact_command(command: Command, mode: Mode | None = Mode.JSON) -> Command:
    """``command`` as a record holds it: a call signal's payload replaced by its filler.

    ``mode`` is the mode of the connection a ``Receive`` came on: a
    plain-text-mode frame is a chat message, never a call frame, and is kept.
    Everything else is returned as it is (the same object).
    """
    match command:
        case Receive() if mode is not Mode.TEXT:
            text = _redact_frame(command.text)
            return command if text is command.text else dataclasses.replace(command, text=text)
        case CallSignal() if command.sdp is not None or command.candidate is not None:
            return dataclasses.replace(
                command,
                sdp=None if command.sdp is None else filler(command.sdp),
                candidate=None if command.candidate is None else filler(command.candidate),
            )
        case _:
            return command


def _redact_frame(text: str) -> str:
    """A JSON frame with the string values of its top-level ``sdp`` and
    ``candidate`` keys replaced in place, if it is a call frame with one.

    The frame keeps its length in characters (the replacement is never
    longer, as the codec writes the shortest JSON for each character; spaces
    after it make up the rest) and decodes to the same object but for the
    filler, so the engine does with it exactly what it did with the frame.
    """
    if "sdp" not in text and "candidate" not in text and "\\" not in text:
        return text  # neither key can be in it, not even escaped
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return text  # refused as invalid JSON: relayed to no one
    kind = obj.get("type") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or kind not in _SIGNAL_TYPES:
        return text
    try:
        spans = _payload_spans(text)
    except (ValueError, IndexError):  # pragma: no cover - json.loads read it just now
        return filler(text)  # the content must not be kept, even if the replay then differs
    out: list[str] = []
    done = 0
    for start, end, value in spans:
        stand_in = json.dumps(filler(value), ensure_ascii=False)
        out += (text[done:start], stand_in, " " * (end - start - len(stand_in)))
        done = end
    out.append(text[done:])
    return "".join(out)


def _payload_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, value) of each string value of a top-level payload key, in order.

    Walks the object as ``json.loads`` reads it (its own value scanner, the
    same whitespace), so a key given twice is found twice.
    """
    spans: list[tuple[int, int, str]] = []

    def skip(i: int) -> int:
        while i < len(text) and text[i] in _JSON_WHITESPACE:
            i += 1
        return i

    i = skip(0)
    if text[i] != "{":
        raise ValueError("not an object")
    i = skip(i + 1)
    if text[i] == "}":
        return spans
    while True:
        if text[i] != '"':
            raise ValueError("expected a key")
        key, i = _DECODER.raw_decode(text, i)
        i = skip(i)
        if text[i] != ":":
            raise ValueError("expected ':'")
        start = i = skip(i + 1)
        value, i = _DECODER.raw_decode(text, i)
        if key in _PAYLOADS and isinstance(value, str):
            spans.append((start, i, value))
        i = skip(i)
        if text[i] == "}":
            return spans
        if text[i] != ",":
            raise ValueError("expected ','")
        i = skip(i + 1)


# -- recording -------------------------------------------------------------------------


class _DrawnIds:
    """Passes ids through from the real source, noting each for the record."""

    def __init__(self, source: IdSource) -> None:
        self._source = source
        self.drawn: list[list[str]] = []

    def session_id(self) -> str:
        value = self._source.session_id()
        self.drawn.append(["s", value])
        return value

    def resume_token(self) -> str:
        value = self._source.resume_token()
        self.drawn.append(["t", value])
        return value


class Recorder:
    """An engine whose every call is also written, as one line, to ``write``.

    Use :attr:`engine` for reads (sessions, rooms, stats) and this object's
    :meth:`handle` and :meth:`tick` to drive it. ``write`` gets each line
    without its newline, the header first. A record holds message text,
    user names and resume tokens: keep it as private as the history. It
    never holds a call's SDP or ICE candidates (see :func:`redact_command`).
    """

    def __init__(self, config: Config, ids: IdSource, write: Callable[[str], None]) -> None:
        self._ids = _DrawnIds(ids)
        self.engine = Engine(config, self._ids)
        self._write = write
        self._step = 0
        write(_dumps({"chatcore_record": RECORD_VERSION, "config": encode(config)}))

    def handle(self, command: Command, now: float) -> list[Effect]:
        kept = command
        if isinstance(command, Receive | CallSignal):
            kept = redact_command(command, self._mode(command.conn))
        try:
            effects = self.engine.handle(command, now)
        except Exception as exc:
            self._line({"now": now, "cmd": encode(kept)}, None, exc)
            raise
        self._line({"now": now, "cmd": encode(kept)}, effects, None)
        return effects

    def _mode(self, conn_id: ConnId) -> Mode | None:
        """The mode of connection ``conn_id`` (None: not open, the engine ignores it)."""
        conn = self.engine._st.conns.get(conn_id)
        return None if conn is None else conn.mode

    def tick(self, now: float) -> list[Effect]:
        try:
            effects = self.engine.tick(now)
        except Exception as exc:
            self._line({"now": now, "tick": True}, None, exc)
            raise
        self._line({"now": now, "tick": True}, effects, None)
        return effects

    def next_deadline(self) -> float | None:
        return self.engine.next_deadline()

    def _line(
        self, line: dict[str, Json], effects: list[Effect] | None, exc: Exception | None
    ) -> None:
        self._step += 1
        line["n"] = self._step
        if self._ids.drawn:
            line["ids"] = self._ids.drawn
            self._ids.drawn = []
        if exc is not None:
            line["raised"] = type(exc).__name__
        else:
            line["fx"] = [effect_digest(e) for e in effects or ()]
        self._write(_dumps(line))


# -- replaying -------------------------------------------------------------------------


class _OutOfIds(Exception):
    pass


class _RecordedIds:
    """Gives back, call by call, the ids the recorded engine drew."""

    def __init__(self) -> None:
        self.queue: list[list[str]] = []

    def _take(self, kind: str) -> str:
        if not self.queue or self.queue[0][0] != kind:
            raise _OutOfIds(kind)
        return self.queue.pop(0)[1]

    def session_id(self) -> str:
        return self._take("s")

    def resume_token(self) -> str:
        return self._take("t")


@dataclass(frozen=True, slots=True, kw_only=True)
class Divergence:
    """Where a replay first differs from its record."""

    step: int
    """The record's step number (1 is the first call after the header)."""
    now: float
    command: Command | None
    """The command of that step, None for a tick."""
    index: int | None
    """Which effect differs (its position in the step's list), None if not an effect."""
    expected: str | None
    """The recorded digest of that effect, None if the replay produced one more."""
    actual: Effect | None
    """What the replay produced at ``index``, None if it produced fewer."""
    reason: str

    def __str__(self) -> str:
        what = "tick" if self.command is None else repr(self.command)
        lines = [
            f"divergence at step {self.step} (now={self.now!r}): {self.reason}",
            f"  command: {what}",
        ]
        if self.index is not None:
            lines.append(f"  effect #{self.index}: recorded digest {self.expected or '(none)'}")
            lines.append(
                f"  replay produced: {self.actual!r}"
                if self.actual is not None
                else "  replay produced: (no effect)"
            )
        return "\n".join(lines)


def read_header(line: str) -> Config:
    """The config of a record's header line; raises :class:`RecordError` if it is not one."""
    try:
        header = json.loads(line)
    except ValueError:
        raise RecordError("the record's first line is not JSON") from None
    if not isinstance(header, dict) or "chatcore_record" not in header:
        raise RecordError("the record does not start with its header (rotated away?)")
    if header["chatcore_record"] != RECORD_VERSION:
        raise RecordError(f"record version {header['chatcore_record']!r} is not {RECORD_VERSION}")
    config: Config = decode(header["config"], Config)
    return config


def replay(
    lines: Iterable[str], *, override: Mapping[str, object] | None = None
) -> Divergence | None:
    """Run a record through a fresh engine; the first divergence, or None if identical.

    ``override`` replaces config fields of the header (to see what a change
    would do). Raises :class:`RecordError` when the record itself is broken
    (no header, a step missing); a truncated last line (a writer that died)
    ends the replay there.
    """
    it = iter(lines)
    first = next(it, None)
    if first is None:
        raise RecordError("the record is empty")
    config = read_header(first)
    if override:
        config = dataclasses.replace(config, **override)  # type: ignore[arg-type]
    ids = _RecordedIds()
    engine = Engine(config, ids)
    expected_step = 0
    pending: str | None = None
    for raw in it:
        if pending is not None:
            raise RecordError(f"a line after step {expected_step} is not JSON")
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            pending = raw  # tolerated only as the very last line
            continue
        expected_step += 1
        if line.get("n") != expected_step:
            raise RecordError(f"step {expected_step} is missing (found {line.get('n')!r})")
        divergence = _replay_step(engine, ids, line)
        if divergence is not None:
            return divergence
    return None


def _replay_step(engine: Engine, ids: _RecordedIds, line: dict[str, Json]) -> Divergence | None:
    now = float(line["now"])
    command = None if line.get("tick") else decode_command(line["cmd"])
    ids.queue = [list(d) for d in line.get("ids", ())]
    step = int(line["n"])

    def diverged(
        reason: str,
        index: int | None = None,
        expected: str | None = None,
        actual: Effect | None = None,
    ) -> Divergence:
        return Divergence(
            step=step,
            now=now,
            command=command,
            index=index,
            expected=expected,
            actual=actual,
            reason=reason,
        )

    try:
        effects = engine.tick(now) if command is None else engine.handle(command, now)
    except _OutOfIds as exc:
        return diverged(f"the engine drew an id ({exc}) the record does not have")
    except Exception as exc:
        if line.get("raised") == type(exc).__name__:
            return None
        return diverged(f"raised {type(exc).__name__}: {exc}")
    if "raised" in line:
        return diverged(f"the recorded engine raised {line['raised']}; the replay did not")
    if ids.queue:
        return diverged(f"the engine drew {len(ids.queue)} fewer ids than recorded")
    recorded: list[str] = line["fx"]
    for i, effect in enumerate(effects):
        if i >= len(recorded):
            return diverged("an effect more than recorded", i, None, effect)
        if effect_digest(effect) != recorded[i]:
            return diverged("an effect differs", i, recorded[i], effect)
    if len(recorded) > len(effects):
        i = len(effects)
        return diverged("an effect fewer than recorded", i, recorded[i], None)
    return None
