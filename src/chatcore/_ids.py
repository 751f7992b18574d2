"""Where session ids and resume tokens come from.

The engine draws no randomness of its own: it asks an :class:`IdSource`.
Adapters pass :class:`RandomIds` fed by the OS's random bytes (the engine host
draws them 4 KiB at a time: ``chatcore_host._entropy``); tests pass
:class:`SeededIds`, which gives the same ids for the same seed.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Protocol

__all__ = ["IdSource", "RandomIds", "SeededIds"]


class IdSource(Protocol):
    def session_id(self) -> str:
        """A new id, unique among this engine's sessions (it is shown to clients)."""
        ...

    def resume_token(self) -> str:
        """A new unguessable token: whoever holds it may resume the session."""
        ...


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class RandomIds:
    """Ids from an entropy source such as ``secrets.token_bytes``."""

    def __init__(self, entropy: Callable[[int], bytes]) -> None:
        self._entropy = entropy

    def session_id(self) -> str:
        return _text(self._entropy(9))

    def resume_token(self) -> str:
        return _text(self._entropy(24))


class SeededIds:
    """Deterministic ids for tests and simulations: same seed, same ids."""

    def __init__(self, seed: int | str = 0) -> None:
        self._seed = str(seed)
        self._count = 0

    def _next(self, n: int) -> str:
        self._count += 1
        digest = hashlib.sha256(f"{self._seed}:{self._count}".encode()).digest()
        return _text(digest[:n])

    def session_id(self) -> str:
        return self._next(9)

    def resume_token(self) -> str:
        return self._next(24)
