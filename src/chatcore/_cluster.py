"""Several processes, one chat: what this engine tells the others and learns from them.

Owns which rooms and users the bus must carry to this process (``RoomHeld``,
``UserHeld``), taking a room up once it is loaded and the bus confirmed its
channel (``Subscribed``: its head probed, members asked and told), checking a
user's direct messages once their channel is confirmed, probing room heads in
the log (``LoadHeads``, on a timer and after ``BusResumed``), presence facts
shared with other processes (``Share`` / ``Shared``) and the members they
hold, processes that are gone, sessions parked for any process to claim
(``SessionParked``, ``ClaimSession``, ``SessionClaimed``, ``SessionTaken``,
``SessionAsked``) and the two halves of a session's move, so that nobody sees
it (``MemberMoved``, ``MemberArrived``). Everything here is inert unless
``Config.cluster`` is on. It never decides the order of messages (the log
does) and never delivers one itself: a message learnt from the bus or from a
probe goes through ``_messages`` like any other. What it knows of the others
is in ``_peers``.
"""

from __future__ import annotations

from typing import assert_never

from ._commands import (
    BusResumed,
    ClaimRefused,
    Connect,
    HeadsFailed,
    HeadsLoaded,
    ParkedRoom,
    ProcessGone,
    SessionClaimed,
    Shared,
    Subscribed,
)
from ._effects import (
    ClaimSession,
    Effect,
    LoadHeads,
    LoadInbox,
    RoomHeld,
    RoomReleased,
    SessionGone,
    SessionParked,
    Share,
    UserHeld,
    UserReleased,
)
from ._errors import LocalProtocolError
from ._events import ReadMark, Typing
from ._facts import (
    MemberArrived,
    MemberDeparted,
    MemberMoved,
    MembersAsked,
    MembersDigest,
    MembersTold,
    ReadMarked,
    TypingChanged,
)
from ._messages import adopt_room, behind, held_back
from ._names import dm_users, is_valid_room
from ._outbox import broadcast
from ._peers import Peers
from ._presence import came_or_went
from ._room import Room
from ._session import Session, SessionInput, SessionState, TokenBucket, fire
from ._state import EngineState
from ._timers import GraceOver, HeadProbe

__all__ = [
    "BusCommand",
    "claim",
    "claim_answered",
    "flush",
    "forget_departures",
    "handle",
    "moved_away",
    "moved_in",
    "park",
    "probe",
    "probe_live",
    "rechecked",
    "room_arrived",
    "unpark",
]

BusCommand = HeadsLoaded | HeadsFailed | BusResumed | Subscribed | Shared | ProcessGone


def handle(st: EngineState, cmd: BusCommand, out: list[Effect]) -> None:
    """Apply one bus command (claims are the engine's: they open connections)."""
    peers = st.peers
    match cmd:
        case HeadsLoaded():
            if cmd.ref in peers.probes:
                peers.probes.discard(cmd.ref)
                _answered(peers, cmd.ref)
                for name, (head, epoch) in cmd.heads.items():
                    if (room := st.rooms.get(name)) is not None:
                        behind(st, room, head, epoch, out)
        case HeadsFailed():
            peers.probes.discard(cmd.ref)  # the rooms stay idle: probed next time
            _answered(peers, cmd.ref)
        case BusResumed():
            # Whatever was published while the bus was away may be lost: every room
            # asks the log, and rooms taken up before (their channels are back)
            # exchange members again, since comings and goings were lost too.
            # (Which channels are back the adapter says with Subscribed.)
            _load_heads(st, tuple(st.rooms), out)
            _exchange_members(st, [n for n in st.rooms if n in peers.asked], out)
            # A direct message in a conversation not held here came only on its
            # recipient's channel, and no probe covers that room: ask the log.
            for user in sorted(peers.users_confirmed):
                _recheck(st, user, out)
        case Subscribed():
            _subscribed(st, cmd, out)
        case Shared():
            if (room := st.rooms.get(cmd.room)) is not None:
                _shared(st, room, cmd, out)
        case ProcessGone():
            _forget_predictions(st, cmd.origin, out)
            for heard in peers.seen.values():
                heard.pop(cmd.origin, None)
            for name, origins in list(peers.remote.items()):
                users = origins.pop(cmd.origin, None)
                if users and (room := st.rooms.get(name)) is not None:
                    for user in sorted(users):
                        _remote_left(st, room, user, out)
        case _:
            assert_never(cmd)


def _answered(peers: Peers, ref: int) -> None:
    if peers.asking:
        for name in [n for n, r in peers.asking.items() if r == ref]:
            del peers.asking[name]


# -- holding rooms and users ---------------------------------------------------------


def room_arrived(st: EngineState, room: Room, out: list[Effect]) -> None:
    """A room was loaded into memory: note it, and deliver what came meanwhile."""
    if st.peers.on:
        room.flips = st.peers.flips
        room.heard = st.now
        st.peers.touch_room(room.name)
        for move, user in st.peers.arriving.get(room.name, {}).items():
            _departure_half(st, room, user, _HERE, move, out)
    held_back(st, room, out)


def flush(st: EngineState, out: list[Effect]) -> None:
    """End of a step: tell the adapter what the step changed, in an order it can
    follow (subscribe, then share; share, then unsubscribe)."""
    peers = st.peers
    touched = list(dict.fromkeys(peers.touched_rooms))
    peers.touched_rooms.clear()
    flips = list(peers.flips)
    peers.flips.clear()  # (in place: rooms hold this list)
    facts: list[Share] = []
    for name, user, arrived in flips:
        seq = _numbered(st, name, held=True)
        fact = MemberArrived(user=user, seq=seq) if arrived else MemberDeparted(user=user, seq=seq)
        facts.append(Share(room=name, fact=fact))
    loading = st.awaits.rooms
    for name in touched:
        if name not in st.rooms:  # what was known of the others' members went with it
            peers.asked.discard(name)
            peers.remote.pop(name, None)
            peers.halves.pop(name, None)
            peers.seen.pop(name, None)
            peers.doubts.pop(name, None)
            peers.predicted.pop(name, None)
            if name not in peers.retell:  # else kept for the room's last tell
                peers.seq.pop(name, None)
        if name not in peers.rooms and (name in st.rooms or name in loading):
            # Subscribed from the start of the load: a message published while the
            # room loads is held and merged by offset, never missed between the two.
            peers.rooms.add(name)
            out.append(RoomHeld(room=name))
    if touched:
        _take_up(st, touched, out, probe=True)
    out += facts
    for name in touched:
        if name in peers.rooms and name not in st.rooms and name not in loading:
            peers.rooms.discard(name)
            peers.confirmed.discard(name)
            out.append(RoomReleased(room=name))
    for user in dict.fromkeys(peers.touched_users):
        if user in st.by_user and user not in peers.users:
            peers.users.add(user)
            out.append(UserHeld(user=user))
        elif user not in st.by_user and user in peers.users:
            peers.users.discard(user)
            peers.users_confirmed.discard(user)
            out.append(UserReleased(user=user))
    peers.touched_users.clear()
    if (st.rooms or peers.retell) and not peers.probe_gen:
        peers.probe_gen = st.awaits.next_ref()
        peers.last_tick = peers.last_digest = st.now
        st.timers.push(st.now + st.config.head_probe_interval / 2, HeadProbe(peers.probe_gen))


def _subscribed(st: EngineState, cmd: Subscribed, out: list[Effect]) -> None:
    """The bus confirmed these channels: what was published on them before may
    have been missed. The rooms are taken up (at the end of the step, once loaded)."""
    peers = st.peers
    for name in cmd.rooms:
        if name in peers.rooms and name not in peers.confirmed:
            peers.confirmed.add(name)
            peers.touch_room(name)
    for user in cmd.users:
        if user in peers.users and user not in peers.users_confirmed:
            peers.users_confirmed.add(user)
            _user_confirmed(st, user, out)


def _ready(st: EngineState, name: str) -> bool:
    """Loaded, and heard on the bus: a room on its channel, a direct-message room
    on the channel of one of its parties."""
    if name not in st.rooms:
        return False
    pair = dm_users(name)
    if pair is None:
        return name in st.peers.confirmed
    return pair[0] in st.peers.users_confirmed or pair[1] in st.peers.users_confirmed


def _take_up(st: EngineState, names: list[str], out: list[Effect], *, probe: bool) -> None:
    """Rooms loaded and confirmed for the first time: the log says what the bus may
    have missed before (one ``LoadHeads`` for them all, not for every room held),
    and this process asks the other holders for their members and tells its own.
    Whichever of two processes takes a room up last, the other hears it then and
    answers, so both end up knowing both sides."""
    peers = st.peers
    fresh = [n for n in dict.fromkeys(names) if n not in peers.asked and _ready(st, n)]
    if probe:
        _load_heads(st, tuple(fresh), out)
    peers.asked.update(fresh)
    _exchange_members(st, fresh, out)


def _exchange_members(st: EngineState, names: list[str], out: list[Effect]) -> None:
    """Ask the other holders of these rooms for their members, and tell them ours."""
    for name in names:
        out.append(Share(room=name, fact=MembersAsked()))
        if users := _own(st, st.rooms[name]):
            _tell(st, name, users, out)


def _own(st: EngineState, room: Room) -> tuple[str, ...]:
    """The members this process answers for in the room: its sessions in it, and
    the users of sessions claimed here that have it in their record (not welcomed
    yet: parked, or waiting for their rooms), whom the others count here."""
    arriving = st.peers.arriving.get(room.name)
    if not arriving:
        return tuple(sorted(room.users))
    return tuple(sorted({*room.users, *arriving.values()}))


def _user_confirmed(st: EngineState, user: str, out: list[Effect]) -> None:
    """The user's channel is confirmed: their direct-message rooms held here are
    taken up (heard from now on), and the log is asked which of them hold
    something unread, for one published before the channel was confirmed."""
    peers = st.peers
    sessions = st.by_user.get(user)
    if not sessions:
        return
    for session in sessions.values():
        for name in session.rooms:
            if dm_users(name) is not None:
                peers.touch_room(name)
    _recheck(st, user, out)


def _recheck(st: EngineState, user: str, out: list[Effect]) -> None:
    """Ask the log which of the user's direct-message rooms hold something unread
    (``LoadInbox``), for a message the bus may have lost on the user's channel:
    published before it was confirmed, or while the bus was away (``BusResumed``:
    one query per user with a session here). The rooms held or loading here are
    left to their head probes (``rechecked``), so nothing comes twice. (Only
    users with a session here are held, so confirmed.)"""
    ref = st.awaits.next_ref()
    st.peers.rechecks[ref] = user
    out.append(LoadInbox(ref=ref, user=user, limit=st.config.max_rooms_per_session))


def rechecked(st: EngineState, ref: int, rooms: tuple[str, ...], out: list[Effect]) -> bool:
    """The answer to a user's recheck (False: not one). A direct-message room with
    something unread that is not held here is loaded for the user's sessions, which
    get what is unread in it, as if the bus had brought it."""
    peers = st.peers
    user = peers.rechecks.pop(ref, None)
    if user is None:
        return False
    if user not in st.by_user:
        return True
    for name in rooms[: st.config.max_rooms_per_session]:
        pair = dm_users(name)
        if pair is None or user not in pair or name in st.rooms or name in st.awaits.rooms:
            continue
        peers.unread[name] = user
        adopt_room(st, name, out)
    return True


# -- head probes -----------------------------------------------------------------------


def probe_live(st: EngineState, timer: HeadProbe) -> bool:
    return timer.gen == st.peers.probe_gen


def probe(st: EngineState, timer: HeadProbe, now: float, out: list[Effect]) -> None:
    """Ask the log for the heads of rooms the bus said nothing of since the last
    tick. Ticks come every half interval, so a message the bus lost is fetched
    within one interval (plus the log's answer)."""
    peers = st.peers
    if not st.rooms and not peers.retell:
        peers.probe_gen = 0
        return
    _retell(st, now, out)
    _settle_doubts(st, now, out)
    _settle_predictions(st, now, out)
    if now >= peers.last_digest + st.config.presence_check_interval:
        peers.last_digest = now
        _digest(st, now, out)
    idle = tuple(name for name, room in st.rooms.items() if room.heard <= peers.last_tick)
    peers.last_tick = now
    if idle and not peers.probes:
        _load_heads(st, idle, out)
    st.timers.push(now + st.config.head_probe_interval / 2, timer)


def _load_heads(st: EngineState, rooms: tuple[str, ...], out: list[Effect]) -> None:
    if rooms:
        ref = st.awaits.next_ref()
        st.peers.probes.add(ref)
        out.append(LoadHeads(ref=ref, rooms=rooms))


# -- presence across processes ----------------------------------------------------------


def _shared(st: EngineState, room: Room, cmd: Shared, out: list[Effect]) -> None:
    fact = cmd.fact
    match fact:
        case MemberArrived():
            _heard(st, room, cmd.origin, fact.seq, change=True)
            _told(st, room, cmd.origin, {fact.user}, out, replace=False)
            if fact.move:
                _arrival_half(st, room, fact.user, fact.move, out)
        case MemberMoved():
            _heard(st, room, cmd.origin, fact.seq, change=True)
            _departure_half(st, room, fact.user, fact.to, fact.move, out)
            if fact.last:
                _remote_gone(st, room, cmd.origin, fact.user, out)
        case MemberDeparted():
            _heard(st, room, cmd.origin, fact.seq, change=True)
            known = st.peers.remote.get(room.name, {}).get(cmd.origin)
            if known is not None and fact.user in known:
                known.discard(fact.user)
                _remote_left(st, room, fact.user, out)
        case MembersTold():
            _heard(st, room, cmd.origin, fact.seq, change=False)
            _told(st, room, cmd.origin, set(fact.users), out, replace=True)
        case MembersAsked():
            if not fact.of:
                if users := _own(st, room):
                    _tell(st, room.name, users, out)
            elif not _heard_of(st, room.name, fact.of):
                _tell(st, room.name, _own(st, room), out)  # (it may be this process)
        case MembersDigest():
            _digest_heard(st, room, cmd.origin, fact.seq, out)
        case TypingChanged():
            typing = Typing(room=room.name, user=fact.user, active=fact.active)
            broadcast(st, room, typing, None, out, ephemeral=True, skip_user=fact.user)
        case ReadMarked():
            offset = min(fact.offset, room.head)
            if offset > room.reads.get(fact.user, 0):
                room.reads[fact.user] = offset
                mark = ReadMark(room=room.name, user=fact.user, offset=offset)
                broadcast(st, room, mark, None, out, ephemeral=True)
        case _:
            assert_never(fact)


def _told(
    st: EngineState, room: Room, origin: str, users: set[str], out: list[Effect], *, replace: bool
) -> None:
    """Process ``origin`` has ``users`` in the room (all of them, if ``replace``)."""
    known = st.peers.remote.setdefault(room.name, {}).setdefault(origin, set())
    if replace:
        for user in sorted(known - users):
            known.discard(user)
            _doubt(st, room, user, out)
    limit = st.config.max_remote_members
    for user in sorted(users - known):
        if user not in room.remote and len(room.remote) >= limit:
            break  # bounded: more are not listed here
        known.add(user)
        if room.add_remote(user):
            came_or_went(st, room, user, out)


def _remote_left(st: EngineState, room: Room, user: str, out: list[Effect]) -> None:
    if room.remove_remote(user):
        came_or_went(st, room, user, out)


def _remote_gone(st: EngineState, room: Room, origin: str, user: str, out: list[Effect]) -> None:
    """Process ``origin`` has no session of ``user`` in the room any more."""
    known = st.peers.remote.get(room.name, {}).get(origin)
    if known is not None and user in known:
        known.discard(user)
        _remote_left(st, room, user, out)


# -- presence that the bus lost ------------------------------------------------------------
#
# Pub/sub drops a fact silently (a subscriber's buffer overflowed, a publish
# timed out), and a lost ``MemberDeparted`` leaves a member listed for ever on
# the others. So a process numbers its presence changes per room (``seq``),
# tells all its members again (``MembersTold`` with the number of its last
# change) once a room's members here have been quiet for a tick after a change,
# and every ``presence_check_interval`` tells the number of each room with
# members here (``MembersDigest``); a process whose view of it is behind that
# number asks it (``MembersAsked(of=...)``). A tell replaces the sharer's
# members; a user it drops that no departure was heard of stays listed for two
# more probe intervals (a doubt: the user may only have moved, and the other half
# of the move be lost too), and a process that said nothing for two check
# intervals while members were listed for it is taken to have let the room go
# (its last tell lost) the same way.


def _numbered(st: EngineState, name: str, *, held: bool = False) -> int:
    """The number of a presence change shared now in room ``name`` (0: unnumbered,
    for a room this process neither holds nor has just let go); the room is told
    again once quiet. ``held``: it is held, or was until this step."""
    peers = st.peers
    if not held and name not in st.rooms and name not in peers.seq:
        return 0
    seq = peers.seq.get(name, 1) + 1
    peers.seq[name] = seq
    first = peers.retell.get(name)
    peers.retell[name] = (st.now if first is None else first[0], st.now)
    return seq


def _tell(st: EngineState, name: str, users: tuple[str, ...], out: list[Effect]) -> None:
    """Tell the room's members here, all of them, as of the last change."""
    peers = st.peers
    peers.retell.pop(name, None)
    seq = peers.seq.setdefault(name, 1) if name in st.rooms else peers.seq.pop(name, 0)
    out.append(Share(room=name, fact=MembersTold(users=users, seq=seq)))


def _retell(st: EngineState, now: float, out: list[Effect]) -> None:
    """Rooms whose members here changed and have been quiet since the last tick
    (or changing for a whole probe interval) are told again: a lost change, the
    last of a burst included, is repaired within one interval."""
    peers = st.peers
    since = now - st.config.head_probe_interval
    for name, (first, last) in list(peers.retell.items()):
        if last <= peers.last_tick or first <= since:
            room = st.rooms.get(name)
            _tell(st, name, () if room is None else _own(st, room), out)


def _digest(st: EngineState, now: float, out: list[Effect]) -> None:
    """Each room with members here tells its number; what was heard of the others
    is checked for silence."""
    peers = st.peers
    for name, room in st.rooms.items():
        members = room.users or peers.arriving.get(name)  # (``_own`` without sorting)
        if members and name in peers.asked and name not in peers.retell:
            out.append(Share(room=name, fact=MembersDigest(seq=peers.seq.setdefault(name, 1))))
    silent = now - 2 * st.config.presence_check_interval
    for name, origins in peers.seen.items():
        for origin, (_, heard) in list(origins.items()):
            if heard < silent:
                del origins[origin]
                known = peers.remote.get(name, {}).get(origin)
                if known and (held := st.rooms.get(name)) is not None:
                    for user in sorted(known):
                        _doubt(st, held, user, out)
                    known.clear()


def _heard(st: EngineState, room: Room, origin: str, seq: int, *, change: bool) -> None:
    """A numbered presence fact from ``origin``: a change that does not follow the
    last one heard means one was missed (until its next tell)."""
    if seq:
        origins = st.peers.seen.setdefault(room.name, {})
        if change:
            before = origins.get(origin)
            if before is None or before[0] != seq - 1:
                seq = -1
        origins[origin] = (seq, st.now)


_NAMED = -2
"""What was heard of a process only named as where a user moved: nothing yet."""


def _heard_of(st: EngineState, name: str, origin: str) -> bool:
    """Whether process ``origin`` said anything of its members in room ``name``."""
    heard = st.peers.seen.get(name, {}).get(origin)
    return (heard is not None and heard[0] != _NAMED) or origin in st.peers.remote.get(name, {})


def _digest_heard(st: EngineState, room: Room, origin: str, seq: int, out: list[Effect]) -> None:
    origins = st.peers.seen.setdefault(room.name, {})
    before = origins.get(origin)
    if before is not None and before[0] == seq:
        origins[origin] = (seq, st.now)
        return
    origins[origin] = (-1, st.now)
    st.share(room.name, MembersAsked(of=origin), out)


def _doubt(st: EngineState, room: Room, user: str, out: list[Effect]) -> None:
    """A process no longer has ``user`` in the room, and no departure was heard:
    listed for two more probe intervals (counted once however many such), by
    when the process the user may have moved to has told its members again."""
    doubts = st.peers.doubts.setdefault(room.name, {})
    if user in doubts:
        _remote_left(st, room, user, out)
    doubts[user] = st.now + 2 * st.config.head_probe_interval


def _settle_doubts(st: EngineState, now: float, out: list[Effect]) -> None:
    peers = st.peers
    for name, doubts in list(peers.doubts.items()):
        room = st.rooms.get(name)  # (let go in this tick: forgotten at its end)
        for user, until in list(doubts.items()):
            if room is not None and _due(st, name, until, now):
                del doubts[user]
                _remote_left(st, room, user, out)
        if not doubts:
            del peers.doubts[name]


def _due(st: EngineState, name: str, until: float, now: float) -> bool:
    """Whether a doubt or a prediction in room ``name`` standing until ``until``
    ends now: once this process has heard everything of every other process it
    knows there (a tell, or a digest that matched, since anything was missed),
    or else two check intervals later, at the latest."""
    if until > now:
        return False
    if until + 2 * st.config.presence_check_interval <= now:
        return True
    return all(seq >= 1 for seq, _ in st.peers.seen.get(name, {}).values())


# -- sessions that move: two halves, heard in either order --------------------------------
#
# A session claimed by process B from process A is one move with two halves: A
# shares ``MemberMoved(to=B)`` (and stops counting the user, if that was its last
# session there), B shares ``MemberArrived(move=...)`` when the session joins its
# rooms (or gives them up, or moves on before it could). The bus orders one
# publisher's facts, never two publishers'. So a process that hears the departure
# half first predicts the arrival: it counts the user once more, on B's behalf,
# before A lets go of them, until B's arrival half replaces the prediction with
# what B said. A prediction is kept apart from what B itself said: B's older facts
# (its earlier session of the user leaving) must not cancel it. A process that
# hears the arrival half first notes it, so that the departure half predicts
# nothing (B's own departure may have come already). A move is named by its
# session and how many times it moved, so a half whose other half never comes
# (lost on the bus, heard before the room was held) matches nothing else; the
# halves kept are bounded per room, and a process that is gone takes the
# predictions for it along. B predicts its own claimed sessions the same way (as
# ``_HERE``) in the rooms of their record that it holds, until their welcome: a
# session parked on B before its welcome is a member there, as it was on A, and
# B holds those rooms and tells of it (``_own``) as of its own members.

_HERE = "\x00here"
"""The process a prediction is for when it is this one (no origin is named so)."""


def _remember(
    st: EngineState, room: Room, move: str, half: tuple[str, str], out: list[Effect]
) -> None:
    halves = st.peers.halves.setdefault(room.name, {})
    if len(halves) >= st.config.max_remote_members:
        oldest = next(iter(halves))  # its other half is long overdue
        user, to = halves.pop(oldest)
        _unpredict(st, room.name, oldest)
        if to:
            _remote_left(st, room, user, out)
    halves[move] = half


def _departure_half(
    st: EngineState, room: Room, user: str, to: str, move: str, out: list[Effect]
) -> None:
    """The departure half of ``move`` (``user`` now on ``to``), shared or heard, or
    predicted here for a session claimed here (``to`` is ``_HERE``)."""
    halves = st.peers.halves.get(room.name, {})
    first = halves.get(move)
    if first is None:
        _remember(st, room, move, (user, to), out)
        if room.add_remote(user):  # the prediction counts like a process holding them
            came_or_went(st, room, user, out)
        if to != _HERE:
            until = st.now + 2 * st.config.head_probe_interval
            st.peers.predicted.setdefault(room.name, {})[move] = until
            # Wait to hear from ``to`` (or of its silence) before the prediction ends.
            st.peers.seen.setdefault(room.name, {}).setdefault(to, (_NAMED, st.now))
    elif not first[1]:  # the arrival half came first
        del halves[move]
    elif first[1] == _HERE and to != _HERE:
        # Heard after this process predicted its own claim: counted already, and
        # now the half the arrival matches.
        halves[move] = (user, to)


def _arrival_half(st: EngineState, room: Room, user: str, move: str, out: list[Effect]) -> None:
    """The arrival half of ``move``, heard (after counting the user on its origin)
    or shared (the user is a member here, or gave the room up): it replaces the
    prediction if the departure half came first."""
    first = st.peers.halves.get(room.name, {}).pop(move, None)
    if first is None:
        _remember(st, room, move, (user, ""), out)
    elif first[1]:
        _unpredict(st, room.name, move)
        _remote_left(st, room, first[0], out)
        if first[1] == _HERE:  # this process's own prediction: the departure half is to come
            _remember(st, room, move, (user, ""), out)


def _settle_predictions(st: EngineState, now: float, out: list[Effect]) -> None:
    """Predictions whose arrival half has not come within two probe intervals end:
    the process the user moved to has told its members by then (its claim made it
    tell them again within one), so it counts the user if it has them. A departure
    half heard late (after its arrival half, in an earlier hold of the room) or an
    arrival half the bus lost leaves nobody listed for ever."""
    peers = st.peers
    for name, moves in list(peers.predicted.items()):
        room = st.rooms.get(name)
        halves = peers.halves.get(name, {})
        for move, until in list(moves.items()):
            if room is not None and _due(st, name, until, now):
                del moves[move]
                half = halves.pop(move, None)  # (always the prediction: see _unpredict)
                if half is not None:
                    _remote_left(st, room, half[0], out)
        if not moves:
            del peers.predicted[name]


def _unpredict(st: EngineState, name: str, move: str) -> None:
    """The prediction of ``move`` is gone from ``halves``: so is its end (so that
    these stay within the bound of ``halves``)."""
    moves = st.peers.predicted.get(name)
    if moves is not None and moves.pop(move, None) is not None and not moves:
        del st.peers.predicted[name]


def _forget_predictions(st: EngineState, origin: str, out: list[Effect]) -> None:
    """Process ``origin`` is gone: no arrival half will come from it."""
    for name, halves in st.peers.halves.items():
        gone = [move for move, (_, to) in halves.items() if to == origin]
        room = st.rooms.get(name)
        for move in gone:
            user, _ = halves.pop(move)
            _unpredict(st, name, move)
            if room is not None:
                _remote_left(st, room, user, out)


def moved_away(st: EngineState, session: Session, by: str, out: list[Effect]) -> set[str]:
    """The session moves to process ``by``: share the departure half in each of its
    rooms (and predict its user there). Returns the rooms where it was the user's
    last session here: leaving them is the move's, not a departure."""
    arrived = session.moved
    if arrived is not None:  # claimed here, moving on before its welcome
        names = dict.fromkeys(p.room for p in arrived[1])
        _arrive(st, session, *arrived, out, settle=False, local=False)
        session.moved = None
    else:
        names = dict.fromkeys(session.rooms)
    move = f"{session.id}.{session.moves + 1}"
    last = set()
    for name in names:
        room = st.rooms.get(name)
        mine = 1 if name in session.rooms else 0
        alone = room is None or room.users.get(session.user, 0) <= mine
        seq = _numbered(st, name)
        moved = MemberMoved(user=session.user, to=by, move=move, last=alone, seq=seq)
        st.share(name, moved, out)
        if room is not None:
            _departure_half(st, room, session.user, by, move, out)
        if alone:
            last.add(name)
    if arrived is not None:  # counted on for the next move first: it never leaves here
        for p in arrived[1]:
            if (room := st.rooms.get(p.room)) is not None:
                _arrival_half(st, room, session.user, arrived[0], out)
    return last


def forget_departures(st: EngineState, user: str, rooms: set[str]) -> None:
    """Take back the departures that ending a moved session noted in ``rooms``."""
    if rooms:
        st.peers.flips[:] = [f for f in st.peers.flips if f[1] != user or f[2] or f[0] not in rooms]


def moved_in(st: EngineState, session: Session, out: list[Effect]) -> None:
    """A session claimed from another process joined its rooms (its welcome) or
    ended before it could: share the arrival half of its move in each room it had
    there, carry its read marks over, and say it left the rooms it is not in."""
    if session.moved is not None:
        _arrive(st, session, *session.moved, out, settle=True)
        session.moved = None


def _arrive(
    st: EngineState,
    session: Session,
    move: str,
    parked: tuple[ParkedRoom, ...],
    out: list[Effect],
    *,
    settle: bool,
    local: bool = True,
) -> None:
    user = session.user
    arriving = st.peers.arriving
    for p in parked:
        if (moves := arriving.get(p.room)) is not None:
            moves.pop(move, None)
            if not moves:
                del arriving[p.room]
        room = st.rooms.get(p.room)
        here = room is not None and user in room.users
        st.share(p.room, MemberArrived(user=user, move=move, seq=_numbered(st, p.room)), out)
        if room is not None:
            if here and p.epoch == room.epoch and p.read > room.reads.get(user, 0):
                room.reads[user] = p.read
            if local:
                _arrival_half(st, room, user, move, out)
        if settle and not here:
            st.share(p.room, MemberDeparted(user=user, seq=_numbered(st, p.room)), out)


# -- sessions any process can claim -----------------------------------------------------


def park(st: EngineState, session: Session, out: list[Effect]) -> None:
    """The session lost its connection: record it for any process to claim."""
    peers = st.peers
    if not peers.on or session.token in peers.taken:
        return
    peers.parked.add(session.token)
    if session.moved is not None:
        _hold_record(st, session, session.moved[1], out)
    rooms = [] if session.moved is None else list(session.moved[1])
    for name in session.rooms:
        room = st.rooms[name]
        rooms.append(
            ParkedRoom(
                room=name,
                offset=session.delivered.get(name, room.head),
                epoch=room.epoch,
                read=room.reads.get(session.user, 0),
            )
        )
    out.append(
        SessionParked(
            token=session.token,
            id=session.id,
            user=session.user,
            rooms=tuple(rooms),
            until=st.now + st.config.grace_period,
            moves=session.moves,
        )
    )


def _hold_record(
    st: EngineState, session: Session, record: tuple[ParkedRoom, ...], out: list[Effect]
) -> None:
    """A session claimed here is parked before its welcome: the rooms of its record
    stay held (loaded if they are not), so that this process hears who asks for
    their members and answers for its user, as the old process did while it was
    parked there. Its next connection, or its end, lets them go."""
    st.release_wanted(session)
    names = [p.room for p in record if is_valid_room(p.room)]
    session.wanted = names
    st.want(session, names)
    for name in names:
        if name not in st.rooms:
            st.load_room(name, session, None, out)


def unpark(st: EngineState, session: Session, out: list[Effect]) -> None:
    """The session resumed here or ended: its record goes (unless another process
    took it, whose record it is now)."""
    peers = st.peers
    if session.token in peers.parked:
        peers.parked.discard(session.token)
        if session.token not in peers.taken:
            out.append(SessionGone(token=session.token))


def claim(st: EngineState, cmd: Connect, out: list[Effect]) -> bool:
    """A resume token this process does not know: ask for the parked session.
    True if the connection now waits for the answer."""
    peers = st.peers
    if peers.answered is cmd:
        peers.answered = None
        return False
    if not peers.on or cmd.resume is None:
        return False
    if cmd.conn in peers.claiming:
        raise LocalProtocolError(f"connection {cmd.conn!r} is already open")
    ref = st.awaits.next_ref()
    peers.claims[ref] = cmd
    peers.claiming[cmd.conn] = (ref, [])
    out.append(ClaimSession(ref=ref, token=cmd.resume, user=cmd.user))
    return True


def claim_answered(
    st: EngineState, cmd: SessionClaimed | ClaimRefused, now: float, out: list[Effect]
) -> tuple[Connect, list[str]] | None:
    """The claim is answered: the connect to run again (finding the session now,
    or starting a fresh one) and the frames its client sent meanwhile; None if
    the connection went away (a claimed session is then parked again, as it was)."""
    peers = st.peers
    connect = peers.claims.pop(cmd.ref, None)
    if connect is None:
        return None  # an answer nobody waits for
    waiting = peers.claiming.pop(connect.conn, None)
    claimed = (
        cmd
        if isinstance(cmd, SessionClaimed)
        and cmd.user == connect.user
        and cmd.token == connect.resume
        and cmd.token not in st.sessions
        else None
    )
    if claimed is not None and waiting is None:
        # Ours now, away: it waits out its grace period here, parked, and answers
        # for its user in the rooms it had until it resumes or ends.
        park(st, _adopt(st, claimed, now, out), out)
        return None
    if claimed is not None:
        _adopt(st, claimed, now, out)
        offsets = {p.room: p.offset for p in claimed.rooms}
        offsets.update(connect.offsets)
        epochs = {p.room: p.epoch for p in claimed.rooms}
        epochs.update(connect.epochs)
        rooms = tuple(dict.fromkeys((*(p.room for p in claimed.rooms), *connect.rooms)))
        connect = Connect(
            conn=connect.conn,
            user=connect.user,
            rooms=rooms,
            resume=connect.resume,
            offsets=offsets,
            epochs=epochs,
            mode=connect.mode,
        )
    if waiting is None:
        return None
    peers.answered = connect
    return connect, waiting[1]


def _adopt(st: EngineState, claimed: SessionClaimed, now: float, out: list[Effect]) -> Session:
    config = st.config
    session = Session(
        claimed.id,
        claimed.token,
        claimed.user,
        TokenBucket(config.rate_burst, now),
        TokenBucket(config.request_burst, now),
    )
    session.moves = claimed.moves + 1
    move = f"{session.id}.{session.moves}"
    session.moved = (move, claimed.rooms)
    for p in claimed.rooms:
        st.peers.arriving.setdefault(p.room, {})[move] = session.user
        _numbered(st, p.room)  # its members here changed, told in the next tell
        if (room := st.rooms.get(p.room)) is not None:
            _departure_half(st, room, session.user, _HERE, move, out)
    # It was live on another process and lost its connection: it comes in as any
    # dropped session, waiting out its grace period to be resumed.
    fire(session, SessionInput.READY)
    fire(session, SessionInput.DROP)
    session.detach_gen += 1
    st.timers.push(now + config.grace_period, GraceOver(session, session.detach_gen))
    st.sessions[session.token] = session
    st.by_id[session.id] = session
    st.by_user.setdefault(session.user, {})[session.id] = session
    st.peers.touch_user(session.user)
    assert session.state is SessionState.DETACHED
    return session
