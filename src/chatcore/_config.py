"""Engine configuration: every bound and policy, with its default."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Config"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Limits and timings. Times are seconds; sizes are bytes of UTF-8.

    Raises ``ValueError`` on construction if a value is out of range.
    """

    grace_period: float = 30.0
    """How long a dropped session waits for its client to resume."""
    max_rooms_per_session: int = 128
    max_text_bytes: int = 64 * 1024
    """Largest message text; larger gets error ``too_large``."""
    max_frame_bytes: int = 80 * 1024
    """Largest client frame the codec reads (text plus JSON framing)."""
    echo: bool = False
    """Send a sender's own message back to the sending connection too."""
    typing_ttl: float = 5.0
    history_window: int = 1000
    """Messages per room kept in memory; older ones are read from the log. Also how
    far a live connection may fall behind its room: one whose next message has left
    the window is closed with 1013 ``slow consumer``."""
    history_page_max: int = 100
    outbox_frames: int = 256
    outbox_bytes: int = 1024 * 1024
    """Per-connection bound on frames and bytes handed out but not yet written.

    Past half, chat messages wait in the room's window and are replayed as writes
    are reported; replies to the connection's own requests may use the rest."""
    rate_burst: int = 10
    rate_per_second: float = 10.0
    """Chat messages per session: a burst, then a sustained rate."""
    request_burst: int = 60
    request_per_second: float = 30.0
    """Every client request (typing, read, history, join...) per session."""
    dm_inbox: bool = True
    """A new session also joins the user's direct-message rooms that hold messages
    the user has not marked read nor answered (the log is asked with
    ``LoadInbox``), newest first, within ``max_rooms_per_session``: a direct message sent while its
    recipient was away is there when they come back."""
    presence_limit: int = 1000
    """Rooms with more users than this send no ``joined``/``left`` events (a
    crowd's comings and goings would drown its messages); ``members`` on join
    still lists everyone."""
    presence_batch_above: int = 50
    """Rooms with more users than this announce comings and goings together: one
    ``presence`` frame per ``presence_interval`` instead of a ``joined`` or ``left``
    per user (N joins in a row would otherwise be N*N/2 frames)."""
    presence_interval: float = 0.5
    """How long a crowded room collects comings and goings before it tells them."""
    max_sessions_per_user: int = 16
    """Sessions one user may hold, counting those in their grace period."""
    ping_interval: float = 25.0
    pong_timeout: float = 20.0
    max_pending_frames: int = 32
    """Frames a connection may send before its welcome; more are refused."""
    call_ring_timeout: float = 30.0
    """A call nobody answers within this ends (``ended`` reason ``timeout``)."""
    call_connect_timeout: float = 30.0
    """An answered call whose sides report no ``connected`` within this ends (``failed``)."""
    call_signal_ttl: float = 5.0
    """How long a call signal waits for a session in its grace period; then it is dropped."""
    call_held_max: int = 64
    """Call signals held per session in its grace period; later ones are dropped."""
    max_calls_per_session: int = 4
    """Calls one session may have placed or answered at once."""
    max_sdp_bytes: int = 16 * 1024
    max_candidate_bytes: int = 1024
    signal_burst: int = 60
    signal_per_second: float = 20.0
    """Call frames per session: their own bucket, apart from chat messages and
    requests, so that a burst of ICE candidates neither waits for nor spends them."""
    screen_messages: bool = False
    """Every client message is first shown to the host as a ``Screen`` effect and
    appended only once the host answers ``Screened`` (accept, refuse, replace)."""
    max_screening_per_session: int = 32
    """Messages of one session that may await the host's verdict at once; a send
    beyond this gets ``rate_limited`` (``retry_after`` 1 s), and so does one beyond
    ``max_screening``."""
    max_screening: int = 10_000
    """Messages that may await the host's verdict at once in the whole engine, those
    of sessions that ended meanwhile included (they are still appended if accepted)."""

    max_devices_per_user: int = 8
    """Devices one user may publish keys for (end-to-end encryption); more are refused."""
    max_prekeys_per_device: int = 100
    """One-time prekeys a device may hold in stock, and publish at once."""
    prekeys_low: int = 10
    """A claim that leaves a device with fewer prekeys than this sends ``keys_low``."""

    cluster: bool = False
    """Several processes share the log: the engine emits the bus effects
    (``RoomHeld``, ``Share``, ``SessionParked``...) and probes the heads of the
    rooms it holds (docs/engine.md "Several processes"). Off, it emits none."""
    head_probe_interval: float = 5.0
    """With ``cluster``: how often the heads of held rooms are read from the log
    (one ``LoadHeads``), so that a message the bus lost is fetched within it."""
    presence_check_interval: float = 30.0
    """With ``cluster``: how often each room with members here tells the other
    holders the number of its last presence fact (``MembersDigest``), so that one
    that missed a fact and its repair asks again; a process silent for two of them
    in a room where it had members is taken to have let the room go (docs/engine.md
    "Presence")."""
    max_remote_members: int = 10_000
    """With ``cluster``: users per room known to be members on other processes;
    past it more are not listed (they still receive messages on their process)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Config.{f.name} must be a positive number, got {value!r}")
        if self.max_frame_bytes < self.max_text_bytes:
            raise ValueError("Config.max_frame_bytes must be at least max_text_bytes")
