"""Several processes, one chat: what this engine tells the others and learns from them.

Owns which rooms and users the bus must carry to this process (``RoomHeld``,
``UserHeld``), probing room heads in the log (``LoadHeads``), presence facts
shared with other processes (``Share`` / ``Shared``) and the members they
hold, processes that are gone, and sessions parked for any process to claim.
Everything here is inert unless ``Config.cluster`` is on. It never decides
the order of messages (the log does) and never delivers one itself: a message
learnt from the bus goes through ``_messages`` like any other.
"""

from __future__ import annotations

from ._commands import (
    BusResumed,
    ClaimRefused,
    HeadsFailed,
    HeadsLoaded,
    ProcessGone,
    SessionClaimed,
    SessionTaken,
    Shared,
)
from ._effects import Effect
from ._state import EngineState

__all__ = ["BusCommand", "handle"]

BusCommand = (
    HeadsLoaded
    | HeadsFailed
    | BusResumed
    | Shared
    | ProcessGone
    | SessionClaimed
    | ClaimRefused
    | SessionTaken
)


def handle(st: EngineState, cmd: BusCommand, now: float, out: list[Effect]) -> None:
    """Apply one bus command (a later commit fills these in)."""
