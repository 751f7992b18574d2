"""Errors and codes: what the host program sees raised, and what peers see sent.

Two kinds of failure, kept apart on purpose:

* Misuse by the embedding program (a command for a connection that does not
  exist, a duplicate connection id, a bad configuration) raises
  :class:`LocalProtocolError` *before* any state changes.
* Misbehaviour by a peer (bad JSON, a forbidden room, flooding) never raises:
  it becomes effects, an ``error`` event to that client or a ``Close``.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "ErrorCode", "LocalProtocolError"]


class LocalProtocolError(Exception):
    """The host program used the engine in a way it does not allow.

    Raised before the engine changes any state, so the engine stays usable.
    """


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` event (see docs/protocol.md)."""

    INVALID_JSON = "invalid_json"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    INVALID_NAME = "invalid_name"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    NOT_MEMBER = "not_member"
    ROOM_LIMIT = "room_limit"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    SHUTTING_DOWN = "shutting_down"
    NO_CALL = "no_call"
    CALL_STATE = "call_state"
    CALL_LIMIT = "call_limit"
    REFUSED = "refused"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the engine asks adapters to send."""

    NORMAL = 1000
    GOING_AWAY = 1001
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    HEARTBEAT_TIMEOUT = 4000
    REMOVED = 4003
    """A moderator removed the user from the server; reconnecting starts afresh."""
