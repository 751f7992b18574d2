"""Whatever a peer sends, the engine answers with effects and never raises (h11's rule).

Invariant: for any text frame, decoded or not, ``Engine.handle(Receive(...))``
returns effects; the sender's connection stays open unless the engine closed it
on purpose, and the other members keep receiving.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore import Config, FrameError, decode_request
from chatcore_sim import Simulation

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["send", "dm", "join", "leave", "typing", "read", "history", "ping", ""]
        )
        | st.text(max_size=6)
        | json_values,
        "room": st.sampled_from(["general", "dm:a:b", "x" * 65, ""]) | json_values,
        "text": st.text(max_size=30) | json_values,
        "id": st.text(max_size=140) | json_values,
        "to": st.sampled_from(["bob", "nobody", ""]) | json_values,
        "offset": st.integers(-5, 2**60) | json_values,
        "before": st.integers(-5, 2**60) | json_values,
        "limit": st.integers(-5, 1000) | json_values,
    },
)
frames = fields.map(json.dumps) | st.text(max_size=60) | json_values.map(json.dumps)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, min_size=1, max_size=20))
def test_any_frames_become_effects_never_exceptions(sent: list[str]) -> None:
    sim = Simulation(Config(rate_burst=100, request_burst=100), seed=2)
    mallory = sim.connect("mallory", room="general")
    bob = sim.connect("bob", room="general")
    for frame in sent:
        if mallory.connected:
            mallory.send_raw(frame)
    assert mallory.connected
    alice = sim.connect("alice", room="general")
    alice.send("still working")
    assert bob.texts()[-1] == "still working"


@given(st.text(max_size=200))
def test_the_codec_raises_only_frame_errors(text: str) -> None:
    error: FrameError | None = None
    try:
        decode_request(1, text)
    except FrameError as exc:
        error = exc
    if error is not None:
        assert error.code
        assert error.message
