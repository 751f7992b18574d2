"""End-to-end encryption of direct messages for the Python client (protocol.md section 11).

One :class:`Device` is one client installation: an X25519 identity key and a
stock of one-time X25519 prekeys, kept in a JSON file of its own (private keys
never leave it). For each recipient device a message is sealed on its own:

* a fresh ephemeral key ``E``; the secret is ``DH(IK_sender, IK_recipient) ||
  DH(E, IK_recipient) || DH(E, PK_recipient)`` (the last only when a prekey was
  claimed for that device);
* HKDF-SHA256 turns it into an AES-256-GCM key, bound to both users and devices
  and the room; the ciphertext's tag fails if any byte of it, its nonce, the
  envelope's keys or the names it is bound to were changed.

The server relays the envelope without reading it. What this does not give:
forward secrecy within a session (a claimed prekey is reused for every message
to that device until the client claims again, and prekeys are kept to read
history), nor any check that an identity key belongs to who the server says.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

__all__ = ["Device", "PeerDevice", "Undecryptable"]

_INFO = b"chatcore e2e v1"
_STOCK = 50  # prekeys published at once, and topped up to


class Undecryptable(Exception):
    """A message this device cannot read: ``reason`` says why (shown, never the bytes)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PeerDevice:
    """A device of another user (or another of ours), as a ``keys`` event lists it."""

    user: str
    device: str
    identity: str  # base64 public key
    prekey_id: int | None = None
    prekey: str | None = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise Undecryptable("malformed envelope")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise Undecryptable("malformed envelope") from None


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _public(text: object) -> X25519PublicKey:
    raw = _unb64(text)
    if len(raw) != 32:
        raise Undecryptable("malformed key")
    return X25519PublicKey.from_public_bytes(raw)


def _key(
    secret: bytes, room: str, sender: str, sender_device: str, to: str, to_device: str
) -> bytes:
    info = b"\x00".join(part.encode() for part in (room, sender, sender_device, to, to_device))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + info).derive(secret)


class Device:
    """This installation's keys, loaded from (or created in) ``path``."""

    def __init__(
        self, path: str | os.PathLike[str], *, user: str, device: str | None = None
    ) -> None:
        self.path = Path(path)
        self.user = user
        self._prekeys: dict[int, X25519PrivateKey] = {}
        self._next_id = 1
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            self.device = str(saved["device"])
            self._identity = X25519PrivateKey.from_private_bytes(_unb64(saved["identity"]))
            self._prekeys = {
                int(k): X25519PrivateKey.from_private_bytes(_unb64(v))
                for k, v in saved["prekeys"].items()
            }
            self._next_id = int(saved["next_id"])
        else:
            # Device ids name payloads in an envelope that also carries the sender's
            # own devices: random, so that two users' devices never share one.
            self.device = device or f"py-{secrets.token_hex(6)}"
            self._identity = X25519PrivateKey.generate()
            self._save()
        self.unpublished: dict[int, str] = {}

    @property
    def identity(self) -> str:
        return _b64(_raw_public(self._identity.public_key()))

    def _save(self) -> None:
        saved = {
            "device": self.device,
            "identity": _b64(_raw_private(self._identity)),
            "prekeys": {str(k): _b64(_raw_private(v)) for k, v in self._prekeys.items()},
            "next_id": self._next_id,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        tmp.chmod(0o600)
        tmp.replace(self.path)

    def new_prekeys(self, count: int = _STOCK) -> list[dict[str, Any]]:
        """Make ``count`` prekeys (kept, saved) and return their public halves to publish."""
        made = []
        for _ in range(count):
            key = X25519PrivateKey.generate()
            self._prekeys[self._next_id] = key
            made.append({"id": self._next_id, "key": _b64(_raw_public(key.public_key()))})
            self._next_id += 1
        self._save()
        return made

    def publish_frame(self, count: int = _STOCK) -> dict[str, Any]:
        return {
            "type": "publish_keys",
            "device": self.device,
            "identity": self.identity,
            "prekeys": self.new_prekeys(count),
        }

    def seal(self, room: str, text: str, devices: list[PeerDevice]) -> dict[str, Any]:
        """The ``enc`` envelope of ``text`` for ``devices`` (and this device, to read
        its own messages back from history)."""
        plaintext = text.encode()
        payloads: dict[str, dict[str, Any]] = {}
        me = PeerDevice(self.user, self.device, self.identity)
        for peer in [*devices, me]:
            eph = X25519PrivateKey.generate()
            their_identity = _public(peer.identity)
            secret = self._identity.exchange(their_identity) + eph.exchange(their_identity)
            payload: dict[str, Any] = {"ephemeral": _b64(_raw_public(eph.public_key()))}
            if peer.prekey is not None and peer.prekey_id is not None:
                secret += eph.exchange(_public(peer.prekey))
                payload["prekey_id"] = peer.prekey_id
            key = _key(secret, room, self.user, self.device, peer.user, peer.device)
            iv = secrets.token_bytes(12)
            payload["iv"] = _b64(iv)
            payload["ct"] = _b64(AESGCM(key).encrypt(iv, plaintext, None))
            payloads[peer.device] = payload
        return {"v": 1, "from_device": self.device, "identity": self.identity, "payloads": payloads}

    def open(self, room: str, sender: str, enc: object) -> str:
        """The text of an envelope sent by ``sender`` in ``room``; raises
        :class:`Undecryptable` if it has nothing for this device or was altered."""
        if not isinstance(enc, dict) or enc.get("v") != 1:
            raise Undecryptable("malformed envelope")
        payloads = enc.get("payloads")
        payload = payloads.get(self.device) if isinstance(payloads, dict) else None
        if not isinstance(payload, dict):
            raise Undecryptable("cannot decrypt on this device")
        sender_device = enc.get("from_device")
        if not isinstance(sender_device, str):
            raise Undecryptable("malformed envelope")
        their_identity = _public(enc.get("identity"))
        eph = _public(payload.get("ephemeral"))
        secret = self._identity.exchange(their_identity) + self._identity.exchange(eph)
        prekey_id = payload.get("prekey_id")
        if prekey_id is not None:
            prekey = self._prekeys.get(prekey_id) if isinstance(prekey_id, int) else None
            if prekey is None:
                raise Undecryptable("cannot decrypt on this device")
            secret += prekey.exchange(eph)
        key = _key(secret, room, sender, sender_device, self.user, self.device)
        try:
            plaintext = AESGCM(key).decrypt(
                _unb64(payload.get("iv")), _unb64(payload.get("ct")), None
            )
        except (InvalidTag, ValueError):
            raise Undecryptable("message was altered or is not for this device") from None
        try:
            return plaintext.decode()
        except UnicodeDecodeError:
            raise Undecryptable("malformed plaintext") from None
