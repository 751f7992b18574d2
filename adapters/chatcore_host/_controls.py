"""The embedding API every server shares: a host program moderates and posts from its own code.

:class:`ChatControls` is mixed into ``chatcore_server.ChatServer`` and
``chatcore_asgi.ChatApp``. Each method feeds one engine command through the
server's :class:`EngineHost`, as the admin API does: the change is stored and
reaches every connection at once. Invalid names, an empty or oversized text
(or one starting with the encryption marker),
an offset below 1 raise :class:`chatcore.LocalProtocolError`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from chatcore import Ban, CreateRoom, DeleteMessage, Kick, Mute, Publish, RemoveMember, Unban

from ._host import EngineHost

__all__ = ["ChatControls"]


class ChatControls:
    """Public methods over ``self.engine_host`` (set by the server's ``__init__``)."""

    engine_host: EngineHost

    def create_room(self, room: str, *, private: bool = True, allow: Iterable[str] = ()) -> None:
        """Create or change a room; a private room admits only the users in ``allow``.

        Members no longer allowed are removed (they get ``removed``)."""
        self.engine_host.feed(CreateRoom(room=room, private=private, allow=frozenset(allow)))

    def post(self, room: str, text: str, *, sender: str = "system") -> None:
        """Post ``text`` into ``room`` as ``sender`` (a bot, or the system user).

        It is stored and numbered like any message and reaches every member;
        no membership, access rule, rate limit, screen hook or ack applies to the host.
        """
        self.engine_host.feed(Publish(room=room, sender=sender, text=text))

    def remove(self, user: str, room: str | None = None, *, reason: str = "") -> None:
        """Remove ``user`` from ``room`` (they get ``removed`` and may come back
        unless banned), or with ``room=None`` from the server: every connection
        of theirs gets ``removed`` and is closed with 4003, and their sessions end."""
        if room is None:
            self.engine_host.feed(Kick(user=user, reason=reason))
        else:
            self.engine_host.feed(RemoveMember(room=room, user=user, reason=reason))

    def mute(self, room: str, user: str, seconds: float, *, reason: str = "") -> None:
        """``user``'s sends in ``room`` get ``forbidden`` for ``seconds`` (0: unmute)."""
        if not seconds >= 0:
            raise ValueError("seconds must be 0 or more")
        until = time.time() + seconds if seconds > 0 else None
        self.engine_host.feed(Mute(room=room, user=user, until=until, reason=reason))

    def ban(self, room: str, user: str, *, reason: str = "") -> None:
        """``user`` may not join ``room`` (nor send there); a member is removed."""
        self.engine_host.feed(Ban(room=room, user=user, reason=reason))

    def unban(self, room: str, user: str) -> None:
        """Lift a ban: ``user`` may join ``room`` again (if its access rule admits them)."""
        self.engine_host.feed(Unban(room=room, user=user))

    def delete_message(self, room: str, offset: int) -> None:
        """Show the message at ``offset`` as deleted everywhere (history, replays,
        members get ``deleted``); offsets stay gap-free."""
        self.engine_host.feed(DeleteMessage(room=room, offset=offset))
