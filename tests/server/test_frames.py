"""The shared frame encoder writes exactly what wsproto would, at every length boundary."""

import pytest
from wsproto.frame_protocol import FrameProtocol

from chatcore_server._frames import text_frame


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_matches_wsproto(n: int) -> None:
    payload = ("é" * n).encode()[:n]
    payload = payload.decode(errors="ignore").encode()
    assert text_frame(payload) == bytes(
        FrameProtocol(client=False, extensions=[]).send_data(payload.decode(), fin=True)
    )
