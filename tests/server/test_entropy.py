"""The host's source of session ids and resume tokens: the OS's bytes, drawn in blocks,
each byte handed out once, never the same in a forked child as in its parent."""

from __future__ import annotations

import os
import threading

import pytest

from chatcore_host._entropy import BLOCK, BufferedEntropy


def counting_source() -> tuple[list[int], BufferedEntropy]:
    calls: list[int] = []

    def source(n: int) -> bytes:
        calls.append(n)
        return os.urandom(n)

    return calls, BufferedEntropy(source)


def test_one_draw_from_the_os_serves_many_sessions() -> None:
    calls, entropy = counting_source()
    drawn = [entropy(9) + entropy(24) for _ in range(BLOCK // 33)]  # an id and a token each
    assert calls == [BLOCK]
    assert all(len(d) == 33 for d in drawn)
    assert len(set(drawn)) == len(drawn)
    entropy(33)
    assert calls == [BLOCK, BLOCK]  # the block ran out: the next one


def test_slices_are_the_blocks_bytes_each_handed_out_once() -> None:
    blocks: list[bytes] = []

    def source(n: int) -> bytes:
        blocks.append(os.urandom(n))
        return blocks[-1]

    entropy = BufferedEntropy(source, block=64)
    out = b"".join(entropy(n) for n in (9, 24, 9, 20, 9, 24))
    # 9+24+9+20 = 62 bytes of the first block; 9 does not fit in the 2 left: a new block.
    assert out == blocks[0][:62] + blocks[1][:33]


def test_a_draw_larger_than_a_block_comes_whole_from_the_os() -> None:
    calls, entropy = counting_source()
    assert len(entropy(BLOCK + 1)) == BLOCK + 1
    assert calls == [BLOCK + 1]


def test_threads_sharing_a_buffer_never_get_the_same_bytes() -> None:
    entropy = BufferedEntropy(block=256)
    got: list[bytes] = []

    def draw() -> None:
        mine = [entropy(24) for _ in range(2000)]
        got.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == len(got) == 8000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_does_not_hand_out_its_parents_bytes() -> None:
    entropy = BufferedEntropy()
    entropy(9)  # the parent has a block buffered, nearly all of it still to hand out
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next token, to the parent
        try:
            os.write(write, entropy(24))
        finally:
            os._exit(0)
    os.close(write)
    child = b""
    while chunk := os.read(read, 64):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = entropy(24)  # what a shared buffer would have given the child too
    assert len(child) == 24
    assert child != parent
