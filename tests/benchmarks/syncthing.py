"""Syncthing on loopback, the anchor of the folder-sync benchmark (test_sync_bench.py), and the
measurements both it and the agents go through.

``SyncthingPair.run(workdir)`` starts two instances of Debian's ``syncthing`` (1.19 here), each
with its own ``--home``, a GUI/REST address and API key on loopback, and a TCP listener on
loopback. Their config.xml is written before the first start so that nothing ever leaves the
machine: global and local discovery, relays, NAT traversal (UPnP/NAT-PMP), STUN, usage and crash
reporting and upgrades are off, and each device knows the other as ``tcp://127.0.0.1:PORT``.
One default is changed for fairness: ``setLowPriority`` (Syncthing renices itself, which on a
busy machine measures the scheduler); the agents it is compared with run at normal priority.
``syncthing serve`` runs a monitor process with the server as its child: ``server_pid``.
Folders are added, changed and removed at run time through the REST API
(``/rest/config/folders``), one fresh folder per measurement, on both instances with the same id.

The measurements (``propagation``, ``wait_for_files``, ``UpdateWatcher``...) only look at two
directories on disk, so the agents' side of the benchmark uses the very same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import statistics
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import psutil

from tests.benchmarks._support import percentile
from tests.integration.harness import free_port

LOOPBACK: Final = "127.0.0.1"
DEFAULT_WATCH_DELAY: Final = 10  # Syncthing's fsWatcherDelayS out of the box
MIN_WATCH_DELAY: Final = 1  # the least fsWatcherDelayS takes (whole seconds)
# Everything that would reach past loopback, off; the rest of the options stay at defaults.
OPTIONS: Final[dict[str, str]] = {
    "globalAnnounceEnabled": "false",
    "localAnnounceEnabled": "false",
    "relaysEnabled": "false",
    "natEnabled": "false",
    "urAccepted": "-1",  # usage reporting: declined, and never asked again
    "crashReportingEnabled": "false",
    "autoUpgradeIntervalH": "0",
    "startBrowser": "false",
    "stunKeepaliveStartS": "0",  # 0 disables STUN
    "stunKeepaliveMinS": "0",
    "announceLANAddresses": "false",
    # By default Syncthing renices itself (nice 11 here): on a machine busy with other work that
    # would measure the scheduler, not Syncthing. The agents run at normal priority; so does it.
    "setLowPriority": "false",
}
ENV: Final[dict[str, str]] = {
    **os.environ,
    "STNOUPGRADE": "1",
    "STNORESTART": "1",
    "STNODEFAULTFOLDER": "1",
    "STNOUPGRADECHECK": "1",
}
START_TIMEOUT: Final = 30.0
READ_PAUSE: Final = 0.0002  # between the never-missing reader's reads: a core left for the rest


def syncthing_binary() -> str | None:
    """The ``syncthing`` on PATH (``MESHAGENT_BENCH_SYNCTHING`` overrides), or None."""
    return os.environ.get("MESHAGENT_BENCH_SYNCTHING") or shutil.which("syncthing")


def syncthing_version(binary: str) -> str:
    done = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout.strip() or done.stderr.strip()


# ---------------------------------------------------------------------------- one instance


@dataclass
class Syncthing:
    """One ``syncthing serve`` with its own home, REST on ``gui_port``, peers on ``listen_port``."""

    binary: str
    name: str
    home: Path
    device_id: str
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    gui_port: int = field(default_factory=free_port)
    listen_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _client: httpx.Client | None = None

    @classmethod
    def generate(cls, binary: str, name: str, home: Path) -> Syncthing:
        """Key, certificate and a default config.xml in ``home`` (``syncthing generate``)."""
        done = subprocess.run(
            [binary, "generate", f"--home={home}", "--no-default-folder"],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
            check=False,
        )
        assert done.returncode == 0, f"syncthing generate failed: {done.stdout}{done.stderr}"
        device_id = subprocess.run(
            [binary, "serve", f"--home={home}", "--device-id"],
            capture_output=True,
            text=True,
            timeout=30,
            env=ENV,
            check=True,
        ).stdout.strip()
        return cls(binary, name, home, device_id)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.gui_port}"

    @property
    def address(self) -> str:
        return f"tcp://{LOOPBACK}:{self.listen_port}"

    @property
    def pid(self) -> int:
        """The process started: Syncthing's monitor, which runs the server as its child."""
        assert self.process is not None
        return self.process.pid

    @property
    def server_pid(self) -> int:
        """The process that syncs (the monitor's child; the monitor itself if it has none)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.pid).children()
            if children:
                return max(children, key=lambda c: c.memory_info().rss).pid
        return self.pid

    def write_config(self, peers: Sequence[Syncthing]) -> None:
        """Options off the network, GUI and listener on loopback, ``peers`` known by address."""
        path = self.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        options = root.find("options")
        assert options is not None, "config.xml without <options>"
        for key, value in OPTIONS.items():
            element = options.find(key)
            if element is None:
                element = ET.SubElement(options, key)
            element.text = value
        for element in options.findall("listenAddress"):
            options.remove(element)
        listen = ET.Element("listenAddress")
        listen.text = self.address
        options.insert(0, listen)
        gui = root.find("gui")
        assert gui is not None, "config.xml without <gui>"
        for key, value in (("address", f"{LOOPBACK}:{self.gui_port}"), ("apikey", self.api_key)):
            element = gui.find(key)
            if element is None:
                element = ET.SubElement(gui, key)
            element.text = value
        own = root.find(f"device[@id='{self.device_id}']")
        assert own is not None, "config.xml without this device"
        own.set("name", self.name)
        for peer in peers:
            device = ET.Element(
                "device",
                {
                    "id": peer.device_id,
                    "name": peer.name,
                    "compression": "metadata",
                    "introducer": "false",
                    "skipIntroductionRemovals": "false",
                    "introducedBy": "",
                },
            )
            ET.SubElement(device, "address").text = peer.address
            ET.SubElement(device, "paused").text = "false"
            ET.SubElement(device, "autoAcceptFolders").text = "false"
            root.insert(list(root).index(own) + 1, device)
        tree.write(path, encoding="unicode")

    def start(self) -> None:
        log = (self.home / "syncthing.log").open("ab")
        try:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "serve",
                    f"--home={self.home}",
                    "--no-browser",
                    "--no-restart",
                    "--no-upgrade",
                    f"--gui-address={LOOPBACK}:{self.gui_port}",
                    f"--gui-apikey={self.api_key}",
                    "--logflags=3",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=ENV,
                start_new_session=True,
            )
        finally:
            log.close()
        self._client = httpx.Client(
            base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=30.0
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"syncthing {self.name} exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.get("/rest/system/ping").get("ping") == "pong":
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"syncthing {self.name} REST never answered: {self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(httpx.HTTPError):
                self._client.post("/rest/system/shutdown", timeout=5)
            self._client.close()
            self._client = None
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None

    def log_tail(self, size: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.home / "syncthing.log").read_text(errors="replace")[-size:]
        return ""

    # ------------------------------------------------------------------------ REST

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self._client is not None, "syncthing not started"
        response = self._client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise AssertionError(
                f"syncthing {self.name}: {method} {path} -> {response.status_code} {response.text}"
            )
        return response.json() if response.content else None

    def get(self, path: str, **params: str) -> Any:
        return self._call("GET", path, params=params)

    def add_folder(
        self, folder_id: str, path: Path, peers: Sequence[Syncthing], watch_delay: int
    ) -> None:
        """One send-receive folder shared with ``peers``; Syncthing's defaults for the rest."""
        body = {
            "id": folder_id,
            "label": folder_id,
            "path": str(path),
            "type": "sendreceive",
            "devices": [{"deviceID": d.device_id} for d in (self, *peers)],
            "fsWatcherEnabled": True,
            "fsWatcherDelayS": watch_delay,
        }
        self._call("POST", "/rest/config/folders", json=body)

    def set_watch_delay(self, folder_id: str, seconds: int) -> None:
        self._call("PATCH", f"/rest/config/folders/{folder_id}", json={"fsWatcherDelayS": seconds})

    def remove_folder(self, folder_id: str) -> None:
        self._call("DELETE", f"/rest/config/folders/{folder_id}")

    def folder_status(self, folder_id: str) -> dict[str, Any]:
        return dict(self.get("/rest/db/status", folder=folder_id))

    def completion(self, folder_id: str, device: str) -> dict[str, Any]:
        return dict(self.get("/rest/db/completion", folder=folder_id, device=device))

    def connections(self) -> dict[str, Any]:
        return dict(self.get("/rest/system/connections")["connections"])

    def connected(self, peer: Syncthing) -> bool:
        return bool(self.connections().get(peer.device_id, {}).get("connected"))

    def wire_bytes(self, peer: Syncthing) -> int:
        """Bytes in plus out on the connection with ``peer`` (TLS over TCP, as counted by
        Syncthing), since it started."""
        link = self.connections().get(peer.device_id, {})
        return int(link.get("inBytesTotal", 0)) + int(link.get("outBytesTotal", 0))

    def scan(self, folder_id: str) -> None:
        self._call("POST", "/rest/db/scan", params={"folder": folder_id})


# ---------------------------------------------------------------------------- the pair


@dataclass
class SyncthingPair:
    """Two instances that know each other; ``a`` is where the benchmark writes."""

    a: Syncthing
    b: Syncthing
    version: str

    @classmethod
    @contextlib.contextmanager
    def run(cls, workdir: Path, binary: str) -> Iterator[SyncthingPair]:
        workdir.mkdir(parents=True, exist_ok=True)
        a = Syncthing.generate(binary, "st-a", workdir / "home-a")
        b = Syncthing.generate(binary, "st-b", workdir / "home-b")
        a.write_config([b])
        b.write_config([a])
        pair = cls(a, b, syncthing_version(binary))
        try:
            a.start()
            b.start()
            wait_for(lambda: a.connected(b) and b.connected(a), 60, "syncthing a <-> b connected")
            yield pair
        finally:
            a.stop()
            b.stop()

    @property
    def both(self) -> tuple[Syncthing, Syncthing]:
        return self.a, self.b

    def share(self, folder_id: str, path_a: Path, path_b: Path, watch_delay: int) -> None:
        path_a.mkdir(parents=True, exist_ok=True)
        path_b.mkdir(parents=True, exist_ok=True)
        self.a.add_folder(folder_id, path_a, [self.b], watch_delay)
        self.b.add_folder(folder_id, path_b, [self.a], watch_delay)

    def set_watch_delay(self, folder_id: str, seconds: int) -> None:
        for one in self.both:
            one.set_watch_delay(folder_id, seconds)

    def unshare(self, folder_id: str) -> None:
        for one in self.both:
            with contextlib.suppress(AssertionError, httpx.HTTPError):
                one.remove_folder(folder_id)

    def in_sync(self, folder_id: str, files: int | None = None) -> bool:
        """Both idle, neither needing anything, each seeing the other complete; with ``files``,
        both holding exactly that many files."""
        for me, other in ((self.a, self.b), (self.b, self.a)):
            status = me.folder_status(folder_id)
            if status.get("state") != "idle" or status.get("needTotalItems", 0) != 0:
                return False
            if files is not None and status.get("localFiles") != files:
                return False
            completion = me.completion(folder_id, other.device_id)
            if completion.get("completion") != 100 or completion.get("needItems", 0) != 0:
                return False
        return True

    def wait_in_sync(self, folder_id: str, timeout: float, files: int | None = None) -> None:
        wait_for(lambda: self.in_sync(folder_id, files), timeout, f"syncthing {folder_id} in sync")


# ---------------------------------------------------------------------------- measurements


def wait_for(probe: Callable[[], object], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def rss_bytes(pid: int) -> int:
    """Resident memory of one process and its children."""
    total = 0
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process and its children."""
    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def idle_cpu(pids: Sequence[int], seconds: float) -> list[float]:
    """Each process's CPU share (percent of one core) over ``seconds`` of doing nothing."""
    before = [cpu_seconds(pid) for pid in pids]
    started = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - started
    return [100.0 * (cpu_seconds(pid) - b) / elapsed for pid, b in zip(pids, before, strict=True)]


def text_lines(lines: int, marker: str) -> bytes:
    return "".join(f"line {n:03d} of a small text file ({marker})\n" for n in range(lines)).encode()


@dataclass(frozen=True)
class Propagation:
    """Seconds from a one-line edit written on one side to the new content read on the other."""

    seconds: list[float]
    timeouts: int

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def p99(self) -> float:
        return percentile(self.seconds, 99)

    def summary(self) -> dict[str, float]:
        return {
            "p50_s": self.p50,
            "p99_s": self.p99,
            "min_s": min(self.seconds, default=float("nan")),
            "max_s": max(self.seconds, default=float("nan")),
            "runs": len(self.seconds),
            "timeouts": self.timeouts,
        }


def propagation(
    source: Path,
    replica: Path,
    repeats: int,
    *,
    timeout: float,
    gap: float = 0.3,
    poll: float = 0.002,
) -> Propagation:
    """Edit one line of ``source`` ``repeats`` times (in place, as an editor's plain save does),
    each time polling ``replica`` until it holds the new content. ``source`` must already be in
    sync with ``replica``. ``gap`` seconds between the edits, so that none coalesce."""
    content = source.read_bytes()
    lines = content.decode().splitlines(keepends=True)
    seconds: list[float] = []
    timeouts = 0
    for run in range(repeats):
        middle = len(lines) // 2
        lines[middle] = f"line {middle:03d} edited, run {run} {secrets.token_hex(4)}\n"
        expected = "".join(lines).encode()
        started = time.perf_counter()
        with open(source, "wb") as handle:
            handle.write(expected)
        deadline = started + timeout
        while True:
            with contextlib.suppress(OSError):
                if replica.read_bytes() == expected:
                    seconds.append(time.perf_counter() - started)
                    break
            if time.perf_counter() > deadline:
                timeouts += 1
                break
            time.sleep(poll)
        time.sleep(gap)
    return Propagation(seconds, timeouts)


def make_small_files(root: Path, count: int, size: int, per_dir: int = 100) -> list[Path]:
    """``count`` random files of ``size`` bytes in folders of ``per_dir``; relative paths."""
    names: list[Path] = []
    for n in range(count):
        name = Path(f"d{n // per_dir:04d}") / f"f{n:06d}.bin"
        if n % per_dir == 0:
            (root / name.parent).mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))
        names.append(name)
    return names


def wait_for_files(
    root: Path, names: Sequence[Path], size: int, timeout: float, every: float = 0.05
) -> float:
    """Poll until every name under ``root`` has ``size`` bytes; the monotonic time it happened.
    Both tools write a temporary name and rename it, so the size at the final name means done.
    Only the names still missing are looked at again, so a poll costs little near the end."""
    missing = list(names)
    deadline = time.monotonic() + timeout
    while True:
        still = []
        for name in missing:
            try:
                if os.stat(root / name).st_size != size:
                    still.append(name)
            except OSError:
                still.append(name)
        missing = still
        if not missing:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(missing)} of {len(names)} files still missing under {root} after"
                f" {timeout:.0f} s (first: {missing[0]})"
            )
        time.sleep(every)


def random_file(path: Path, size: int, piece: int = 16 << 20) -> Path:
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, piece))
            handle.write(block)
            left -= len(block)
    return path


def file_digest(path: Path) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def change_middle(path: Path, size: int) -> int:
    """Overwrite ``size`` random bytes in the middle of ``path`` (in place, the length kept);
    returns the offset. The middle of a 1 GiB file is a 512 KiB boundary: the change covers two
    of Syncthing's 512 KiB blocks exactly."""
    offset = path.stat().st_size // 2
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(os.urandom(size))
    return offset


# ---------------------------------------------------------------------------- never missing


def versioned_content(version: int, size: int) -> bytes:
    """A self-checking file: a header with the version, the body's length and its digest."""
    body = (f"{version}:".encode() * (size // 4 + 1))[:size]
    digest = hashlib.blake2b(body, digest_size=16).hexdigest()
    return f"v{version} {len(body)} {digest}\n".encode() + body


def check_content(data: bytes) -> int | None:
    """The version of a complete file, or None if ``data`` is partial or garbled."""
    header, newline, body = data.partition(b"\n")
    parts = header.split()
    if not newline or len(parts) != 3 or not parts[0].startswith(b"v"):
        return None
    try:
        version, length = int(parts[0][1:]), int(parts[1])
    except ValueError:
        return None
    if (
        len(body) != length
        or hashlib.blake2b(body, digest_size=16).hexdigest() != parts[2].decode()
    ):
        return None
    return version


@dataclass
class UpdateWatcher:
    """Reads ``replica`` in a tight loop on a thread and counts every time it is missing or not
    a complete version (``check_content``), and the versions it saw."""

    replica: Path
    reads: int = 0
    missing: int = 0
    partial: int = 0
    versions: set[int] = field(default_factory=set)
    examples: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> UpdateWatcher:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(READ_PAUSE):
            self.reads += 1
            try:
                data = self.replica.read_bytes()
            except FileNotFoundError:
                self.missing += 1
                self._example(f"missing at read {self.reads}")
                continue
            except OSError as exc:
                self.partial += 1
                self._example(f"{type(exc).__name__} at read {self.reads}")
                continue
            version = check_content(data)
            if version is None:
                self.partial += 1
                self._example(f"partial ({len(data)} bytes) at read {self.reads}")
            else:
                self.versions.add(version)

    def _example(self, what: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(what)


def rewrite_repeatedly(
    source: Path,
    updates: int,
    size: int,
    *,
    every: float,
    first_version: int = 1,
    in_place: bool = True,
    scratch: Path | None = None,
) -> int:
    """Write ``updates`` new versions of ``source``: in place (truncate and write in four
    pieces, as a program that saves without a temporary file) or, with ``in_place`` False, an
    atomic save (a temporary file in ``scratch``, outside the synced folder, renamed over it).
    Returns the last version written."""
    version = first_version - 1
    for _ in range(updates):
        version += 1
        data = versioned_content(version, size)
        if in_place:
            quarter = len(data) // 4 + 1
            with open(source, "wb") as handle:
                for start in range(0, len(data), quarter):
                    handle.write(data[start : start + quarter])
                    handle.flush()
        else:
            assert scratch is not None
            temporary = scratch / f".{source.name}.{version}"
            temporary.write_bytes(data)
            os.replace(temporary, source)
        time.sleep(every)
    return version
