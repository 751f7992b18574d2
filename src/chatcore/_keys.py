"""The key directory for end-to-end encrypted direct messages.

Owns the two key requests (``publish_keys``, ``claim_keys``), the storage
effects they become (``StoreDeviceKeys``, ``ClaimPrekeys``), what the log's
answers turn into (``keys_published``, ``keys``, and ``keys_low`` to every
session of a user whose device is running out of prekeys), and the marker
that tells an encrypted message body from plain text. The engine never sees
a private key nor a plaintext: keys and ciphertext are opaque strings here.
Whether a message may be encrypted (direct-message rooms only) is decided in
``_messages``; the envelope's shape in ``_codec``.
"""

from __future__ import annotations

from . import _codec
from ._awaits import PendingKeys
from ._commands import (
    ClaimDeviceKeys,
    DeviceKeysStored,
    KeysFailed,
    PrekeysClaimed,
    PublishDeviceKeys,
)
from ._effects import ClaimPrekeys, Effect, StoreDeviceKeys
from ._errors import ErrorCode
from ._events import KeysEvent
from ._names import is_valid_name
from ._outbox import error, to
from ._session import Session, SessionState
from ._state import EngineState

__all__ = [
    "ENCRYPTED",
    "claim",
    "claimed",
    "failed",
    "publish",
    "stored",
]

ENCRYPTED = _codec.ENCRYPTED
"""What an encrypted message's stored body starts with, before its JSON envelope.

Plain text never does (the engine refuses it), so history, replay and every
store keep working on one text column and still tell the two apart."""


def publish(
    st: EngineState, session: Session, request: PublishDeviceKeys, out: list[Effect]
) -> None:
    config = st.config
    if len(request.prekeys) > config.max_prekeys_per_device:
        error(
            st,
            session,
            ErrorCode.TOO_LARGE,
            f"more than {config.max_prekeys_per_device} prekeys",
            request.device,
            out,
        )
        return
    ref = st.awaits.expect(PendingKeys(session, request.device))
    out.append(
        StoreDeviceKeys(
            ref=ref,
            user=session.user,
            device=request.device,
            identity=request.identity,
            prekeys=request.prekeys,
            max_devices=config.max_devices_per_user,
            max_prekeys=config.max_prekeys_per_device,
        )
    )


def claim(st: EngineState, session: Session, request: ClaimDeviceKeys, out: list[Effect]) -> None:
    if not is_valid_name(request.user):
        error(st, session, ErrorCode.INVALID_NAME, "no such user name", request.user[:64], out)
        return
    ref = st.awaits.expect(PendingKeys(session, request.user))
    out.append(ClaimPrekeys(ref=ref, user=request.user))


def _pending(st: EngineState, ref: int) -> PendingKeys | None:
    refs = st.awaits.refs
    found = refs.get(ref)
    if type(found) is not PendingKeys:
        return None
    del refs[ref]
    return found


def _live(session: Session) -> bool:
    return session.conn is not None and session.state is SessionState.LIVE


def stored(st: EngineState, cmd: DeviceKeysStored, out: list[Effect]) -> None:
    pending = _pending(st, cmd.ref)
    if pending is not None and _live(pending.session) and pending.session.conn is not None:
        event = KeysEvent(
            kind="keys_published", user=pending.session.user, device=cmd.device, prekeys=cmd.stock
        )
        to(st, pending.session.conn, event, out)


def claimed(st: EngineState, cmd: PrekeysClaimed, out: list[Effect]) -> None:
    pending = _pending(st, cmd.ref)
    if pending is not None and _live(pending.session) and pending.session.conn is not None:
        devices = tuple(
            (
                d.device,
                d.identity,
                None if d.prekey is None else d.prekey.id,
                None if d.prekey is None else d.prekey.key,
            )
            for d in cmd.devices
        )
        event = KeysEvent(kind="keys", user=cmd.user, devices=devices)
        to(st, pending.session.conn, event, out)
    # The claim is made whether or not the claimer is still there: the owner hears
    # that its stock runs low either way, on every session it has.
    low = st.config.prekeys_low
    for d in cmd.devices:
        if d.prekey is not None and d.left < low:
            notice = KeysEvent(kind="keys_low", user=cmd.user, device=d.device, prekeys=d.left)
            for s in st.by_user.get(cmd.user, {}).values():
                if _live(s) and s.conn is not None:
                    to(st, s.conn, notice, out)


def failed(st: EngineState, cmd: KeysFailed, out: list[Effect]) -> None:
    pending = _pending(st, cmd.ref)
    if pending is not None:
        code = ErrorCode.UNAVAILABLE if cmd.reason == "store unavailable" else ErrorCode.FORBIDDEN
        error(st, pending.session, code, f"keys: {cmd.reason}", pending.ref_name, out)
