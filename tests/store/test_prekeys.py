"""The key directory in every store: one prekey per device per claim, each handed
out once even when claims race (SQLite and PostgreSQL, for real), kept across a
restart, within its bounds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from chatcore import (
    ClaimPrekeys,
    DeviceKeysStored,
    KeysFailed,
    Prekey,
    PrekeysClaimed,
    StoreDeviceKeys,
)
from chatcore_store import HistoryStore

from .conftest import MakeStore, drop_schema, new_schema

pytestmark = pytest.mark.anyio


def publish(
    user: str, device: str, ids: range, *, identity: str = "IK", devices: int = 8, stock: int = 1000
) -> StoreDeviceKeys:
    return StoreDeviceKeys(
        ref=1,
        user=user,
        device=device,
        identity=f"{identity}-{device}",
        prekeys=tuple(Prekey(id=i, key=f"{device}:{i}") for i in ids),
        max_devices=devices,
        max_prekeys=stock,
    )


async def claim(store: HistoryStore, user: str) -> PrekeysClaimed:
    (answer,) = await store.execute([ClaimPrekeys(ref=2, user=user)])
    assert isinstance(answer, PrekeysClaimed)
    return answer


async def test_claims_take_the_lowest_prekey_of_each_device_until_none_is_left(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    answers = await store.execute(
        [publish("bob", "laptop", range(1, 3)), publish("bob", "phone", range(5, 6))]
    )
    assert answers == [
        DeviceKeysStored(ref=1, device="laptop", stock=2),
        DeviceKeysStored(ref=1, device="phone", stock=1),
    ]
    first = await claim(store, "bob")
    assert [(d.device, d.identity, d.prekey, d.left) for d in first.devices] == [
        ("laptop", "IK-laptop", Prekey(id=1, key="laptop:1"), 1),
        ("phone", "IK-phone", Prekey(id=5, key="phone:5"), 0),
    ]
    second = await claim(store, "bob")
    assert [(d.device, d.prekey) for d in second.devices] == [
        ("laptop", Prekey(id=2, key="laptop:2")),
        ("phone", None),
    ]
    assert (await claim(store, "nobody")).devices == ()


async def test_the_directory_survives_a_restart(make_store: MakeStore) -> None:
    store = await make_store()
    await store.execute([publish("bob", "laptop", range(1, 4))])
    await claim(store, "bob")
    await store.close()
    again = await make_store()
    devices = (await claim(again, "bob")).devices
    assert [(d.identity, d.prekey, d.left) for d in devices] == [
        ("IK-laptop", Prekey(id=2, key="laptop:2"), 1)
    ]


async def test_republishing_adds_new_ids_and_a_new_identity_starts_over(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    await store.execute([publish("bob", "laptop", range(1, 4))])
    (again,) = await store.execute([publish("bob", "laptop", range(2, 6))])  # 2, 3 known
    assert again == DeviceKeysStored(ref=1, device="laptop", stock=5)
    (fresh,) = await store.execute([publish("bob", "laptop", range(9, 10), identity="NEW")])
    assert fresh == DeviceKeysStored(ref=1, device="laptop", stock=1)
    (d,) = (await claim(store, "bob")).devices
    assert (d.identity, d.prekey) == ("NEW-laptop", Prekey(id=9, key="laptop:9"))


async def test_devices_and_stock_are_bounded(make_store: MakeStore) -> None:
    store = await make_store()
    answers = await store.execute(
        [
            publish("bob", "a", range(1, 3), devices=2, stock=3),
            publish("bob", "b", range(1, 2), devices=2, stock=3),
            publish("bob", "c", range(1, 2), devices=2, stock=3),
            publish("bob", "a", range(3, 5), devices=2, stock=3),
        ]
    )
    assert answers[2] == KeysFailed(ref=1, reason="too many devices")
    assert answers[3] == KeysFailed(ref=1, reason="too many prekeys in stock")
    assert [d.device for d in (await claim(store, "bob")).devices] == ["a", "b"]


def check_each_handed_out_once(
    taken: list[tuple[str, int]], devices: int, per_device: int, claims: int
) -> None:
    repeats = [k for k, n in Counter(taken).items() if n > 1]
    assert repeats == []
    # Every claim got a prekey of each device while there were any left.
    assert len(taken) == devices * min(per_device, claims)


async def race(stores: Sequence[HistoryStore], claims_each: int) -> list[tuple[str, int]]:
    taken: list[tuple[str, int]] = []

    async def worker(store: HistoryStore) -> None:
        for _ in range(claims_each):
            for d in (await claim(store, "bob")).devices:
                if d.prekey is not None:
                    taken.append((d.device, d.prekey.id))

    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(worker, store)
    return taken


@pytest.mark.postgres
async def test_concurrent_claims_on_postgres_hand_each_prekey_out_once(pg_url: str) -> None:
    from chatcore_store.postgres import PostgresStore

    schema = new_schema()
    stores = [PostgresStore(pg_url, schema=schema) for _ in range(8)]
    try:
        for store in stores:
            await store.open()
        await stores[0].execute([publish("bob", f"d{i}", range(1, 61)) for i in range(3)])
        taken = await race(stores, claims_each=10)  # 80 claims for 60 prekeys per device
        check_each_handed_out_once(taken, devices=3, per_device=60, claims=80)
    finally:
        for store in stores:
            await store.close()
        await drop_schema(schema)


async def test_concurrent_claims_on_sqlite_hand_each_prekey_out_once(tmp_path: Path) -> None:
    from chatcore_store.sqlite import SQLiteStore

    path = tmp_path / "chat.db"
    stores = [SQLiteStore(path) for _ in range(6)]
    try:
        for store in stores:
            await store.open()
        await stores[0].execute([publish("bob", f"d{i}", range(1, 41)) for i in range(2)])
        taken = await race(stores, claims_each=8)  # 48 claims for 40 prekeys per device
        check_each_handed_out_once(taken, devices=2, per_device=40, claims=48)
    finally:
        for store in stores:
            await store.close()


_CLAIMER = textwrap.dedent(
    """
    import sys, anyio
    from chatcore import ClaimPrekeys
    from chatcore_store.sqlite import SQLiteStore

    async def main() -> None:
        store = SQLiteStore(sys.argv[1], busy_timeout=30.0)
        await store.open()
        for _ in range(int(sys.argv[2])):
            (answer,) = await store.execute([ClaimPrekeys(ref=1, user="bob")])
            for d in answer.devices:
                if d.prekey is not None:
                    print(d.device, d.prekey.id, flush=True)
        await store.close()

    anyio.run(main)
    """
)


async def test_claims_from_several_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    from chatcore_store.sqlite import SQLiteStore

    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    await store.open()
    await store.execute([publish("bob", "laptop", range(1, 51))])
    await store.close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, str(path), "15"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    taken: list[tuple[str, int]] = []
    for proc in procs:
        out, _ = await anyio.to_thread.run_sync(proc.communicate)
        assert proc.returncode == 0
        taken += [(line.split()[0], int(line.split()[1])) for line in out.splitlines()]
    check_each_handed_out_once(taken, devices=1, per_device=50, claims=60)
