"""Baselines and probes for the transfer benchmark (test_bench_transfer.py).

- ``Sshd``: a throwaway ``sshd -D`` on a free loopback port (its own host key and one authorized
  key) for scp and ``tar | ssh``.
- ``Wormhole``: a local magic-wormhole mailbox server and transit relay (``twist``) from a
  throwaway virtualenv, and the send/receive commands against them.
- raw TCP: ``python _transfer_support.py tcp-receive DEST`` prints its port, then writes what
  arrives to DEST; ``tcp-send PORT SOURCE`` streams a file to it. The least a transfer can do.
- ``Sampler``: RSS and CPU of a set of processes (and their children), sampled on a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psutil

from tests.integration.harness import free_port

LOOPBACK: Final = "127.0.0.1"
SSH_CIPHER: Final = "aes128-gcm@openssh.com"
BLOCK: Final = 1 << 20
SFTP_SERVER_PATHS: Final = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------- sshd


def sftp_server() -> str:
    return next((p for p in SFTP_SERVER_PATHS if Path(p).exists()), SFTP_SERVER_PATHS[0])


def write_sshd_config(workdir: Path, port: int, listen: Sequence[str]) -> tuple[Path, Path]:
    """A host key, one authorized client key and an ``sshd_config`` in ``workdir`` for a
    throwaway ``sshd -D``: returns the config and the client's private key."""
    host_key, key = workdir / "host_ed25519", workdir / "id_ed25519"
    for path in (host_key, key):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
            check=True,
            capture_output=True,
        )
    (workdir / "authorized_keys").write_bytes(key.with_suffix(".pub").read_bytes())
    config = workdir / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                *(f"ListenAddress {address}" for address in listen),
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
                "PidFile none",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                f"Subsystem sftp {sftp_server()}",
                "LogLevel ERROR",
            ]
        )
        + "\n"
    )
    # Debian's privilege separation directory, made by the service unit we do not run.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    return config, key


def ssh_options(key: Path) -> list[str]:
    """ssh/scp options for a throwaway sshd: no user config, no host key checks, one cipher."""
    return [
        "-F",
        "/dev/null",
        "-c",
        SSH_CIPHER,
        "-i",
        str(key),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ]


@dataclass
class Sshd:
    process: subprocess.Popen[bytes]
    key: Path
    port: int

    @classmethod
    @contextlib.contextmanager
    def run(cls, workdir: Path) -> Iterator[Sshd]:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        workdir.mkdir(parents=True)
        port = free_port()
        config, key = write_sshd_config(workdir, port, [LOOPBACK])
        with (workdir / "sshd.log").open("wb") as log:
            process = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=log
            )
            try:
                wait_for_port(port, 10)
                yield cls(process, key, port)
            finally:
                stop_process(process)

    def ssh_options(self) -> list[str]:
        return ssh_options(self.key)

    def scp(self, source: Path, destination: Path) -> list[str]:
        user = os.environ.get("USER") or "root"
        return [
            "scp",
            "-q",
            *self.ssh_options(),
            "-P",
            str(self.port),
            str(source),
            f"{user}@{LOOPBACK}:{destination}",
        ]

    def tar_pipe(self, parent: Path, name: str, destination: Path) -> str:
        """A shell pipeline: ``tar`` of parent/name into destination through ssh."""
        user = os.environ.get("USER") or "root"
        ssh = " ".join(
            [
                "ssh",
                *self.ssh_options(),
                "-p",
                str(self.port),
                f"{user}@{LOOPBACK}",
                f"'tar xf - -C {destination}'",
            ]
        )
        return f"tar cf - -C {parent} {name} | {ssh}"


# ---------------------------------------------------------------------------- wormhole


@dataclass
class Wormhole:
    bin_dir: Path
    mailbox_port: int
    relay_port: int

    @classmethod
    @contextlib.contextmanager
    def run(cls, bin_dir: Path, workdir: Path) -> Iterator[Wormhole]:
        workdir.mkdir(parents=True)
        mailbox_port, relay_port = free_port(), free_port()
        processes: list[subprocess.Popen[bytes]] = []
        with (workdir / "servers.log").open("wb") as log:
            try:
                for plugin, port in (
                    ("wormhole-mailbox", mailbox_port),
                    ("transitrelay", relay_port),
                ):
                    processes.append(
                        subprocess.Popen(
                            [
                                str(bin_dir / "twist"),
                                plugin,
                                f"--port=tcp:{port}:interface={LOOPBACK}",
                            ],
                            cwd=workdir,
                            stdout=log,
                            stderr=log,
                        )
                    )
                for port in (mailbox_port, relay_port):
                    wait_for_port(port, 30)
                yield cls(bin_dir, mailbox_port, relay_port)
            finally:
                for process in processes:
                    stop_process(process)

    def _base(self) -> list[str]:
        return [
            str(self.bin_dir / "wormhole"),
            "--relay-url",
            f"ws://{LOOPBACK}:{self.mailbox_port}/v1",
            "--transit-helper",
            f"tcp:{LOOPBACK}:{self.relay_port}",
        ]

    def send(self, source: Path, code: str) -> list[str]:
        return [*self._base(), "send", "--hide-progress", "--code", code, str(source)]

    def receive(self, code: str) -> list[str]:
        return [*self._base(), "receive", "--hide-progress", "--accept-file", code]


# ---------------------------------------------------------------------------- sampler


def _tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children."""
    total = 0.0
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def anon_rss_bytes(pid: int) -> int:
    """Anonymous resident memory (heap, buffers) of one process: RSS less mapped files."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes(pid: int) -> int:
    total = 0
    for process in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


@dataclass
class Sampler:
    """RSS of each named process every ``every`` seconds, on a thread, while in use."""

    pids: dict[str, int]
    every: float = 0.2
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    anon_peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Sampler:
        self.samples = {name: [] for name in self.pids}
        self.anon_peaks = dict.fromkeys(self.pids, 0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic() - started
            for name, pid in self.pids.items():
                self.samples[name].append((now, rss_bytes(pid)))
                self.anon_peaks[name] = max(self.anon_peaks[name], anon_rss_bytes(pid))
            self._stop.wait(self.every)

    def summary(self, name: str) -> dict[str, float]:
        values = [rss for _, rss in self.samples[name]]
        third = max(1, len(values) // 3)
        first, last = max(values[:third]), max(values[-third:])
        return {
            "samples": len(values),
            "peak_mb": max(values) / 1e6,
            "first_third_peak_mb": first / 1e6,
            "last_third_peak_mb": last / 1e6,
            "start_mb": values[0] / 1e6,
            "anon_peak_mb": self.anon_peaks[name] / 1e6,
        }


# ---------------------------------------------------------------------------- raw TCP


def tcp_receive(destination: Path) -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        print(listener.getsockname()[1], flush=True)
        listener.settimeout(60)
        conn, _ = listener.accept()
        with conn, open(destination, "wb") as out:
            buffer = bytearray(BLOCK)
            view = memoryview(buffer)
            while received := conn.recv_into(buffer):
                out.write(view[:received])


def tcp_send(port: int, source: Path) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=60) as conn, open(source, "rb") as src:
        while block := src.read(BLOCK):
            conn.sendall(block)


def tcp_commands(destination: Path) -> tuple[list[str], list[str]]:
    """The receiver command and the sender command prefix (append PORT SOURCE)."""
    me = str(Path(__file__).resolve())
    return (
        [sys.executable, me, "tcp-receive", str(destination)],
        [sys.executable, me, "tcp-send"],
    )


def main(argv: Sequence[str]) -> int:
    match list(argv):
        case ["tcp-receive", destination]:
            tcp_receive(Path(destination))
        case ["tcp-send", port, source]:
            tcp_send(int(port), Path(source))
        case _:
            print(
                "usage: _transfer_support.py tcp-receive DEST | tcp-send PORT SRC", file=sys.stderr
            )
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
