"""A video call between two real Chromium pages on loopback, through a real
``chatcore serve``: the server relays the signalling, the browsers connect.

Chromium runs with fake media devices (a test pattern and a beep) and the
permission prompt answered yes. What a person would notice: Alice calls Bob
from their conversation, Bob's page shows the incoming call, he answers, and
each sees the other's video; hanging up ends the call on both sides.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import CHROMIUM, CHROMIUM_ARGS, _unavailable, chat_server
from .test_browser import WAIT_MS, open_chat

FAKE_MEDIA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]

PEER = """() => {
  const call = window.__chatcore.call;
  if (!call || !call.pc) return null;
  const video = document.getElementById("remote-video");
  return {
    state: call.pc.connectionState,
    remoteVideoTracks: call.pc.getReceivers()
      .filter((r) => r.track && r.track.kind === "video" && r.track.readyState === "live").length,
    width: video.videoWidth,
    height: video.videoHeight,
    ice: call.pc.getConfiguration().iceServers.map((s) => s.urls).flat(),
  };
}"""

CONNECTED = f"""() => {{
  const p = ({PEER})();
  return p !== null && p.state === "connected" && p.remoteVideoTracks > 0 && p.width > 0;
}}"""


@pytest.fixture(scope="module")
def media_browser() -> Iterator[Any]:
    """Chromium with fake camera and microphone, and media permission granted."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        _unavailable(f"chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *FAKE_MEDIA]
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def stun_server() -> Iterator[str]:
    # A STUN address nobody answers on: the page must be given it, and a call on
    # loopback must connect all the same (host candidates need no STUN).
    with chat_server(30.0, "--ice-server", "stun:127.0.0.1:9") as url:
        yield url


def test_two_pages_call_each_other_and_each_receives_the_others_video(
    media_browser: Any, stun_server: str, artifacts: Path
) -> None:
    alice = open_chat(media_browser, stun_server, "alice", "general")
    bob = open_chat(media_browser, stun_server, "bob", "general")
    alice.locator("#member-list [data-user=bob]").click()
    assert alice.locator("#call-video").is_visible()
    assert not bob.locator("#call-video").is_visible()  # #general is no conversation
    alice.click("#call-video")

    bob.locator("#incoming").wait_for()
    assert "alice is calling (video)" in bob.locator("#incoming-text").inner_text()
    alice.locator("#call-status", has_text="Ringing bob").wait_for()
    bob.screenshot(path=artifacts / "call-incoming.png")
    bob.click("#accept")

    for page in (alice, bob):
        page.wait_for_function(CONNECTED, timeout=WAIT_MS)
        peer = page.evaluate(PEER)
        assert peer["state"] == "connected"
        assert peer["remoteVideoTracks"] == 1
        assert peer["width"] > 0
        assert peer["height"] > 0
        assert peer["ice"] == ["stun:127.0.0.1:9"]  # --ice-server reached the page
    alice.locator("#call-status", has_text="In a call with bob").wait_for()
    bob.locator("#call-status", has_text="In a call with alice").wait_for()
    alice.screenshot(path=artifacts / "call-active.png")

    alice.click("#mute")
    muted = alice.evaluate("window.__chatcore.call.local.getAudioTracks().every((t) => !t.enabled)")
    assert muted is True

    bob.click("#hangup")
    alice.locator("#call-panel").wait_for(state="hidden")
    bob.locator("#call-panel").wait_for(state="hidden")
    assert alice.evaluate("window.__chatcore.call") is None
    for page in (alice, bob):
        assert page.errors == []  # type: ignore[attr-defined]
