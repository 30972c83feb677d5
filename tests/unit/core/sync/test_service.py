"""SyncService over in-memory channels: setup offers, pulling and serving, who is refused.

The P2P layer is the transfer tests' FakeNetwork (tests/unit/core/share/fakes.py), with the
capability each opened stream would carry (scope ``share:folder``, the stream's resource) put
where the real validator puts it (``channel.grant``). Disk, index, scanner, watcher and
applier are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest

from meshagent_gui.core.bus import EventBus
from meshagent_gui.core.events import SyncFolderOffered
from meshagent_gui.core.mesh.client import MeshClient
from meshagent_gui.core.p2p.peers import Service
from meshagent_gui.core.p2p.session import ChannelClosed
from meshagent_gui.core.protocol.captoken import Capability
from meshagent_gui.core.protocol.errors import ErrorCode
from meshagent_gui.core.protocol.messages import StreamRole
from meshagent_gui.core.protocol.sync import (
    BlockMissing,
    BlockReply,
    BlockRequest,
    FileRow,
    IndexBatch,
    Subscribe,
    SyncOffer,
)
from meshagent_gui.core.sync import folder as folder_module
from meshagent_gui.core.sync.blocks import digest
from meshagent_gui.core.sync.service import SCOPE, SyncService
from meshagent_gui.errors import UserError
from tests.unit.core.share.fakes import (
    FakeChannel,
    FakeClient,
    FakeDevice,
    FakeNetwork,
    Recorder,
    wait_for,
)

ANN = "a" * 64
BOB = "b" * 64
EVE = "e" * 64


class SyncNetwork(FakeNetwork):
    """Streams carry the capability the validator would have checked: ``share:folder`` for
    the stream's own resource (``resource_of`` may name another, as a hostile token would)."""

    def __init__(self) -> None:
        super().__init__()
        self.resource_of: Callable[[str], str] = lambda resource: resource

    def open(
        self, dialer: FakeDevice, target_id: str, role: StreamRole, resource: str
    ) -> FakeChannel:
        ours = super().open(dialer, target_id, role, resource)
        ours.other.grant = Capability(
            issuer="test",
            holder=dialer.device_id,
            target=target_id,
            scope=SCOPE,
            resource=self.resource_of(resource),
            issued_at=0,
            not_before=0,
            expires_at=1e12,
            jti=uuid.uuid4().hex,
        )
        return ours


def make_sync(
    network: FakeNetwork, device_id: str, home: Path, *, user: str = "ann", policy: str = "own"
) -> tuple[SyncService, Recorder]:
    bus = EventBus()
    events = Recorder(bus)
    users = {ANN: "ann", BOB: "ann", EVE: "eve"}

    async def peer_user(peer: str) -> str | None:
        return users.get(peer)

    service = SyncService(
        peers=network.peers(device_id),
        client=cast(MeshClient, FakeClient()),
        bus=bus,
        data_dir=home / "data",
        device_id=device_id,
        own_user=user,
        peer_user=peer_user,
        peer_name=lambda peer: {ANN: "ann-laptop", BOB: "bob-desk", EVE: "eve"}.get(peer, peer),
        auto_accept=lambda: policy,
        always_accept=frozenset,
        sync_root=lambda: home / "sync",
        versions_days=lambda: 30.0,
        rescan_interval=lambda: 0.5,
        device_name=lambda: device_id[:4],
    )
    return service, events


@asynccontextmanager
async def running(*services: SyncService) -> AsyncIterator[None]:
    async with asyncio.TaskGroup() as tasks:
        runs = [tasks.create_task(service.run()) for service in services]
        try:
            yield
        finally:
            for run in runs:
                run.cancel()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


async def test_a_folder_offered_to_an_own_device_syncs_both_ways(tmp_path: Path) -> None:
    network = SyncNetwork()
    ann, _ = make_sync(network, ANN, tmp_path / "ann")
    bob, bob_events = make_sync(network, BOB, tmp_path / "bob")
    folder = tmp_path / "photos"
    write(folder / "old.txt", b"there before")
    async with running(ann, bob):
        info = await ann.add(folder, BOB)
        assert info.label == "photos" and [p.device_id for p in info.peers] == [BOB]
        [offered] = bob_events.of(SyncFolderOffered)
        assert offered.auto_accepted and offered.folder_id == info.folder_id
        landed = tmp_path / "bob" / "sync" / "photos"
        await wait_for(lambda: read(landed / "old.txt") == b"there before", "the first file")
        write(folder / "sub" / "new.bin", os.urandom(200_000))
        await wait_for(
            lambda: read(landed / "sub" / "new.bin") == read(folder / "sub" / "new.bin"),
            "a new file from ann",
        )
        write(landed / "from-bob.txt", b"hello ann")
        await wait_for(lambda: read(folder / "from-bob.txt") == b"hello ann", "bob's file")
        (folder / "old.txt").unlink()
        await wait_for(lambda: not (landed / "old.txt").exists(), "the deletion")
        [listed] = bob.folders()
        assert listed.folder_id == info.folder_id and listed.path == str(landed)


async def test_a_rename_moves_no_data(tmp_path: Path) -> None:
    network = SyncNetwork()
    ann, _ = make_sync(network, ANN, tmp_path / "ann")
    bob, _ = make_sync(network, BOB, tmp_path / "bob")
    folder = tmp_path / "work"
    content = os.urandom(300_000)
    write(folder / "a.bin", content)
    async with running(ann, bob):
        info = await ann.add(folder, BOB)
        landed = tmp_path / "bob" / "sync" / "work"
        await wait_for(lambda: read(landed / "a.bin") == content, "the file")
        served = ann.folders()[0].peers[0].served_bytes
        assert served >= len(content)
        (folder / "a.bin").rename(folder / "b.bin")
        await wait_for(
            lambda: read(landed / "b.bin") == content and not (landed / "a.bin").exists(),
            "the rename",
        )
        assert ann.find(info.folder_id).info().peers[0].served_bytes == served


async def test_a_declined_offer_is_one_clear_error_and_forgotten(tmp_path: Path) -> None:
    network = SyncNetwork()
    ann, _ = make_sync(network, ANN, tmp_path / "ann")
    eve, _ = make_sync(network, EVE, tmp_path / "eve", user="eve", policy="none")
    folder = tmp_path / "docs"
    folder.mkdir()
    async with running(ann, eve):
        with pytest.raises(UserError, match="eve declined to sync docs") as raised:
            await ann.add(folder, EVE)
        assert raised.value.code == "declined"
        assert ann.folders() == [] and eve.folders() == []


async def test_an_offer_waits_for_the_user_and_lands_where_told(tmp_path: Path) -> None:
    network = SyncNetwork()
    ann, _ = make_sync(network, ANN, tmp_path / "ann")
    eve, eve_events = make_sync(network, EVE, tmp_path / "eve", user="eve")
    folder = tmp_path / "shared"
    write(folder / "x.txt", b"x")
    async with running(ann, eve):
        adding = asyncio.create_task(ann.add(folder, EVE))
        await wait_for(eve.offers, "the offer to wait")
        [offer] = eve.offers()
        assert offer.label == "shared" and offer.peer == ANN
        assert not eve_events.of(SyncFolderOffered)[0].auto_accepted
        await eve.answer_offer(offer.offer_id, True, path=tmp_path / "eve" / "here")
        await adding
        await wait_for(lambda: read(tmp_path / "eve" / "here" / "x.txt") == b"x", "the file")


async def _stream(network: SyncNetwork, dialer: str, target: str, resource: str) -> FakeChannel:
    return network.open(network.device(dialer), target, StreamRole.SYNC, resource)


async def _refused(channel: FakeChannel) -> ChannelClosed:
    with pytest.raises(ChannelClosed) as ended:
        async with asyncio.timeout(5):
            while True:
                await channel.receive()
    return ended.value


async def test_a_device_that_is_not_a_peer_of_the_folder_is_refused(tmp_path: Path) -> None:
    network = SyncNetwork()
    ann, _ = make_sync(network, ANN, tmp_path / "ann")
    bob, _ = make_sync(network, BOB, tmp_path / "bob")
    folder = tmp_path / "private"
    write(folder / "secret.txt", b"only for bob")
    network.device(EVE)  # a room member with a valid share:folder token
    async with running(ann, bob):
        info = await ann.add(folder, BOB)
        channel = await _stream(network, EVE, ANN, info.folder_id)
        channel.post(Subscribe(info.folder_id, "", 0))
        refused = await _refused(channel)
        assert refused.code is ErrorCode.NOT_ALLOWED
        # A token for another resource than the stream's folder is refused before anything.
        network.resource_of = lambda _: "f" * 32
        channel = await _stream(network, BOB, ANN, info.folder_id)
        channel.post(Subscribe(info.folder_id, "", 0))
        assert (await _refused(channel)).code is ErrorCode.NOT_ALLOWED


async def test_a_hostile_row_closes_the_stream_and_writes_nothing(tmp_path: Path) -> None:
    """A peer of the folder that sends a row named outside the folder: the puller aborts the
    stream with a protocol error and nothing is written or stored."""
    network = SyncNetwork()
    bob, _ = make_sync(network, BOB, tmp_path / "bob")
    closures: list[ChannelClosed] = []
    folder_id = "c" * 32

    async def hostile(channel: FakeChannel) -> None:
        try:
            first = await channel.receive()
            if isinstance(first, Subscribe):
                evil = FileRow(
                    name="../escaped.txt",
                    kind="file",
                    deleted=False,
                    size=1,
                    mtime_ns=0,
                    permissions=0o644,
                    version=((1, 1),),
                    sequence=1,
                    modified_by=1,
                )
                channel.post(IndexBatch("d" * 32, (evil,), done=True))
                await channel.receive()  # until it is closed on us
        except ChannelClosed as exc:
            closures.append(exc)

    evil_device = network.device(ANN)
    async with running(bob):
        # ann offers a folder to bob (bob accepts: same user), then serves garbage
        bob_side = network.open(evil_device, BOB, StreamRole.SYNC, folder_id)
        bob_side.post(SyncOffer(folder_id, "loot", "loot"))
        answer = await asyncio.wait_for(bob_side.receive(), 5)
        assert getattr(answer, "accepted", False)
        evil_device.services[StreamRole.SYNC] = Service(StreamRole.SYNC, (SCOPE,), hostile)  # type: ignore[arg-type]
        bob.find(folder_id).peer_online(ANN)
        await wait_for(
            lambda: any(c.code is ErrorCode.PROTOCOL_ERROR for c in closures),
            "bob to refuse the row",
            timeout=15,
        )
        assert not (tmp_path / "bob" / "sync" / "escaped.txt").exists()
        assert not (tmp_path / "bob" / "escaped.txt").exists()
        assert bob.folders()[0].files == 0


async def test_a_peer_flooding_block_requests_is_held_back_and_reads_nothing_outside(
    tmp_path: Path,
) -> None:
    """A peer of the folder asks for 20,000 blocks and reads no reply: the server answers at
    most SERVE_READS batches, then stops reading its requests (bounded memory; on a real
    stream QUIC's flow control then stops the flooder). No request reads outside the folder,
    through a symbolic link or a name that is not there. Then a message a puller may not send
    closes the stream with UNEXPECTED_MESSAGE."""
    network = SyncNetwork()
    ann, _ = make_sync(network, ANN, tmp_path / "ann")
    bob, _ = make_sync(network, BOB, tmp_path / "bob")
    folder = tmp_path / "shared"
    write(folder / "inside.txt", b"in the folder")
    secret = write(tmp_path / "outside.txt", b"not for bob")
    (folder / "link.txt").symlink_to(secret)
    flood = 20_000
    async with running(ann, bob):
        info = await ann.add(folder, BOB)
        channel = await _stream(network, BOB, ANN, info.folder_id)
        channel.post(Subscribe(info.folder_id, "", 0))
        secret_digest = digest(secret.read_bytes())
        for number in range(flood):
            name = "link.txt" if number % 2 else f"nowhere/{number}.txt"
            size = len(secret.read_bytes()) if number % 2 else 7
            channel.post(BlockRequest(number, secret_digest, name, 0, size))
        bound = folder_module.SERVE_READS * folder_module.SERVE_BATCH
        # The server has taken what it may and waits for us to read.
        await wait_for(lambda: len(channel._inbox) > 0, "the first replies", 15)
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert len(channel._inbox) <= bound + 16  # + the index batches
        assert len(channel.other._inbox) >= flood - bound - folder_module.SERVE_BATCH

        answered: dict[int, object] = {}
        while len(answered) < flood:
            message = await asyncio.wait_for(channel.receive(), 15)
            if isinstance(message, BlockReply | BlockMissing):
                answered[message.request_id] = message
        assert all(isinstance(m, BlockMissing) for m in answered.values())

        channel.post(SyncOffer(info.folder_id, "again", "again"))
        refused = await _refused(channel)
        assert refused.code is ErrorCode.UNEXPECTED_MESSAGE
        # ann still serves bob's own streams.
        write(folder / "after.txt", b"still syncing")
        landed = tmp_path / "bob" / "sync" / "shared" / "after.txt"
        await wait_for(lambda: read(landed) == b"still syncing", "a later file", 30)


async def test_a_flood_of_index_rows_is_decided_from_the_index_not_held_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer announcing more new names than the puller remembers (MAX_DIRTY_NAMES, made
    smaller here than each batch of 100 live rows): the names are dropped from memory and
    every stored row is decided from the index instead; all are applied, inside the folder."""
    monkeypatch.setattr(folder_module, "MAX_DIRTY_NAMES", 50)
    network = SyncNetwork()
    bob, _ = make_sync(network, BOB, tmp_path / "bob")
    folder_id = "c" * 32

    async def flooding(channel: FakeChannel) -> None:
        with contextlib.suppress(ChannelClosed):
            if isinstance(await channel.receive(), Subscribe):
                # An empty backlog, then live rows without end (a backlog is decided whole
                # from the index at its end anyway).
                await channel.send(IndexBatch("d" * 32, (), done=True))
                for batch in range(6):
                    rows = tuple(
                        FileRow(
                            name=f"d{batch}/{number:03d}",
                            kind="dir",
                            deleted=False,
                            size=0,
                            mtime_ns=0,
                            permissions=0o755,
                            version=((1, 1),),
                            sequence=batch * 100 + number + 1,
                            modified_by=1,
                        )
                        for number in range(100)
                    )
                    await channel.send(IndexBatch("d" * 32, rows))
                await channel.receive()  # keep the stream open

    evil_device = network.device(ANN)
    async with running(bob):
        bob_side = network.open(evil_device, BOB, StreamRole.SYNC, folder_id)
        bob_side.post(SyncOffer(folder_id, "flood", "flood"))
        answer = await asyncio.wait_for(bob_side.receive(), 5)
        assert getattr(answer, "accepted", False)
        evil_device.services[StreamRole.SYNC] = Service(StreamRole.SYNC, (SCOPE,), flooding)  # type: ignore[arg-type]
        bob.find(folder_id).peer_online(ANN)
        landed = tmp_path / "bob" / "sync" / "flood"
        await wait_for(
            lambda: sum(1 for _ in landed.glob("d*/*")) == 600, "all 600 folders", timeout=60
        )
        assert not (tmp_path / "bob" / "d0").exists()
