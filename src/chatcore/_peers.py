"""What this engine knows of the other processes sharing its log: data only.

Filled and read by ``_cluster`` (and by the few hooks elsewhere that note a
change for it: a room taken or dropped, a user's first or last session, a
member's first or last session in a room). The hooks only append to lists;
``_cluster.flush`` turns them into effects at the end of the step, so that a
room dropped and taken again within one step says nothing.
"""

from __future__ import annotations

from ._commands import Connect, ConnId
from ._events import Message

__all__ = ["Peers"]


class Peers:
    __slots__ = (
        "on",
        "rooms",
        "asked",
        "confirmed",
        "users",
        "users_confirmed",
        "rechecks",
        "unread",
        "touched_rooms",
        "touched_users",
        "flips",
        "remote",
        "loading",
        "adopt",
        "probes",
        "asking",
        "probe_gen",
        "last_tick",
        "parked",
        "claims",
        "claiming",
        "answered",
        "taken",
        "halves",
        "arriving",
        "seq",
        "retell",
        "seen",
        "doubts",
        "last_digest",
        "predicted",
    )

    def __init__(self, on: bool) -> None:
        self.on = on
        # Rooms and users the adapter was told about (RoomHeld, UserHeld).
        self.rooms: set[str] = set()
        self.asked: set[str] = set()  # loaded rooms whose members were asked (MembersAsked)
        self.users: set[str] = set()
        # Of those, the ones whose channel the bus confirmed (Subscribed, BusResumed):
        # a room is taken up (heads probed, members asked and told) once it is
        # both loaded and confirmed.
        self.confirmed: set[str] = set()
        self.users_confirmed: set[str] = set()
        self.rechecks: dict[int, str] = {}  # LoadInbox ref -> user whose channel was confirmed
        # Direct-message rooms loading because a recheck found them unread: the
        # user whose sessions here get what is unread in them.
        self.unread: dict[str, str] = {}
        # Changes noted during the step, for ``_cluster.flush``.
        self.touched_rooms: list[str] = []
        self.touched_users: list[str] = []
        self.flips: list[tuple[str, str, bool]] = []  # (room, user, arrived) of local members
        # room -> origin -> users with a session in the room on that process.
        self.remote: dict[str, dict[str, set[str]]] = {}
        # Messages for rooms still loading, by room and offset (merged once loaded).
        self.loading: dict[str, dict[int, Message]] = {}
        # Direct-message rooms loading because the bus brought one of their messages.
        self.adopt: set[str] = set()
        self.probes: set[int] = set()  # LoadHeads refs in flight
        self.asking: dict[str, int] = {}  # room -> LoadHeads ref asked for its epoch
        self.probe_gen = 0  # of the one live HeadProbe timer (0: none armed)
        self.last_tick = 0.0  # when it last ran: rooms heard of since are not idle
        self.parked: set[str] = set()  # tokens of sessions recorded as parked
        self.claims: dict[int, Connect] = {}  # ClaimSession ref -> the connect waiting
        self.claiming: dict[ConnId, tuple[int, list[str]]] = {}  # conn -> (ref, frames)
        self.answered: Connect | None = None  # a connect whose claim was answered
        self.taken: set[str] = set()  # tokens being handed to another process
        # room -> move -> the half of a session's move heard first, until the other
        # half comes: (user, to) for the departure half (``MemberMoved``), (user, "")
        # for the arrival half (``MemberArrived.move``). See ``_cluster``.
        self.halves: dict[str, dict[str, tuple[str, str]]] = {}
        # room -> move -> user, of the sessions claimed here whose welcome has not
        # come yet (``Session.moved``): members here in the rooms of their record,
        # as the other processes predict, told with our own members.
        self.arriving: dict[str, dict[str, str]] = {}
        # Presence repair (``_cluster``, "Presence" in docs/engine.md). room -> the
        # number of this process's last presence change there, for rooms held (and
        # rooms dropped whose last tell is still to go out).
        self.seq: dict[str, int] = {}
        # room -> (first, last) time its members here changed since its last tell:
        # told again once quiet for a tick (or changing for a whole interval).
        self.retell: dict[str, tuple[float, float]] = {}
        # room -> origin -> (the number up to which every presence change of that
        # process there was heard, -1 if one was missed; when it was last heard).
        self.seen: dict[str, dict[str, tuple[int, float]]] = {}
        # room -> user -> until when a user whom a repair removed (not a departure
        # heard) is still listed, counted once in ``Room.remote``: it may have moved.
        self.doubts: dict[str, dict[str, float]] = {}
        self.last_digest = 0.0  # when the rooms here last told their numbers
        # room -> move -> until when a prediction (``halves``) for another process
        # stands without its arrival half: by then that process told its members.
        self.predicted: dict[str, dict[str, float]] = {}

    @property
    def dirty(self) -> bool:
        return bool(self.touched_rooms or self.touched_users or self.flips)

    def touch_room(self, name: str) -> None:
        if self.on:
            self.touched_rooms.append(name)

    def touch_user(self, user: str) -> None:
        if self.on:
            self.touched_users.append(user)
