"""QUIC across a real link: a veth pair at MTU 1500 between two network namespaces.

The same ends as test_bench_quic.py (_quic_support.py: our endpoint with qh3 and with aioquic,
and TLS 1.3 over TCP with asyncio streams as the baseline), each end in its own process and its
own namespace, plus scp (OpenSSH, ``-c aes128-gcm@openssh.com``, to /dev/null) over the same
link, all in the same run. CPU seconds per GiB for both ends; 32-byte echo RTT p50/p99 (not for
scp). scp's connection setup (an empty-file scp, measured in the same run) is subtracted, so
its figures are for the bulk transfer alone, like the others'. The table ends with scp over
loopback, for comparison with test_bench_quic.py's loopback figures.

    pytest -m benchmark tests/benchmarks/test_bench_netns.py -s     (as root)
    MESHAGENT_BENCH_BYTES=268435456   bytes per run (default 512 MiB; aioquic 1/8, scp 1/2)
    MESHAGENT_BENCH_REPEAT=3          runs per transport (best of)
    MESHAGENT_BENCH_OUT=results.json  also write the results as JSON (a directory gets netns.json)

Needs root and iproute2 (skipped otherwise); scp rows need openssh-server and openssh-client.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.integration.netns import Link, unavailable

from ._measure import write_report
from ._quic_support import CHUNK, GIB, Result, as_json, best_of, table, tls_files
from ._transfer_support import SSH_CIPHER, ssh_options, stop_process, write_sshd_config

MTU: Final = 1500
SSH_PORT: Final = 2222  # inside a namespace of our own: nothing else listens there


# ---------------------------------------------------------------------------- scp


@dataclass
class Sshd:
    """A throwaway ``sshd -D`` (its own host key and one authorized key) in a namespace."""

    process: subprocess.Popen[bytes]
    key: Path
    port: int

    @classmethod
    @contextlib.contextmanager
    def run(cls, workdir: Path, prefix: Sequence[str], listen: Sequence[str]) -> Iterator[Sshd]:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        workdir.mkdir()
        config, key = write_sshd_config(workdir, SSH_PORT, listen)
        log = (workdir / "sshd.log").open("wb")
        process = subprocess.Popen(
            [*prefix, sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=log
        )  # ``ip netns exec`` execs: process.pid is sshd's own
        try:
            yield cls(process, key, SSH_PORT)
        finally:
            stop_process(process)
            log.close()

    def children_cpu(self) -> float:
        """CPU seconds of the connections sshd has served and reaped (cutime + cstime)."""
        deadline = time.monotonic() + 10
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        while children.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.02)  # the last session is still exiting
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # after the ")": state is field 3 of proc(5); cutime and cstime are fields 16 and 17
        ticks = int(fields[16 - 3]) + int(fields[17 - 3])
        return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Copy:
    elapsed: float
    client_cpu: float
    server_cpu: float


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def scp_once(sshd: Sshd, prefix: Sequence[str], host: str, source: Path) -> Copy:
    """One ``scp`` of ``source`` to /dev/null on ``host``; CPU of both ends (scp + ssh here,
    sshd's session + sftp-server there)."""
    command = [
        *prefix,
        "scp",
        "-q",
        *ssh_options(sshd.key),
        "-P",
        str(sshd.port),
        str(source),
        f"root@{host}:/dev/null",
    ]
    server0, client0 = sshd.children_cpu(), _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    client = _children_cpu() - client0
    if done.returncode != 0:
        raise RuntimeError(f"scp failed ({done.returncode}): {done.stderr.decode()[-1000:]}")
    return Copy(elapsed, client, sshd.children_cpu() - server0)


def scp_result(
    name: str, sshd: Sshd, prefix: Sequence[str], host: str, source: Path, repeat: int
) -> Result:
    """Best of ``repeat`` copies, less the setup cost of an empty-file scp (best of as many)."""
    empty = source.with_name("empty")
    empty.touch()
    deadline = time.monotonic() + 10
    while True:  # sshd may still be starting
        try:
            setup = [scp_once(sshd, prefix, host, empty)]
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    setup += [scp_once(sshd, prefix, host, empty) for _ in range(repeat - 1)]
    copies = [scp_once(sshd, prefix, host, source) for _ in range(repeat)]
    size = source.stat().st_size
    gib = size / GIB
    elapsed = min(c.elapsed for c in copies) - min(s.elapsed for s in setup)
    client = min(c.client_cpu for c in copies) - min(s.client_cpu for s in setup)
    server = min(c.server_cpu for c in copies) - min(s.server_cpu for s in setup)
    return Result(
        name=name,
        megabytes_per_s=size / elapsed / 1e6,
        cpu_s_per_gib=(client + server) / gib,
        sender_cpu_s_per_gib=client / gib,
        receiver_cpu_s_per_gib=server / gib,
        rtt_p50_us=math.nan,
        rtt_p99_us=math.nan,
        bytes=size,
        io=f"openssh {SSH_CIPHER}",
    )


# ---------------------------------------------------------------------------- report


def _random_file(path: Path, size: int) -> Path:
    block = os.urandom(CHUNK)
    with path.open("wb") as out:
        for _ in range(size // CHUNK):
            out.write(block)
    return path


# ---------------------------------------------------------------------------- the benchmark


@pytest.mark.benchmark
def test_quic_across_a_veth_pair_against_tls_and_scp(tmp_path: Path) -> None:
    reason = unavailable(nat=False)
    if reason is not None:
        pytest.skip(reason)
    size = int(os.environ.get("MESHAGENT_BENCH_BYTES", 512 * CHUNK)) // CHUNK * CHUNK
    repeat = int(os.environ.get("MESHAGENT_BENCH_REPEAT", "3"))
    missing_ssh = [tool for tool in ("sshd", "scp", "ssh-keygen") if shutil.which(tool) is None]
    tls = tls_files(tmp_path)

    with Link.build(mtu=MTU) as link:
        assert f"mtu {MTU} " in link.left.ip("link", "show", "eth0")
        across = {
            "listener_ip": link.right_ip,
            "dialer_ip": link.left_ip,
            "prefixes": {"listener": link.right.prefix, "dialer": link.left.prefix},
        }
        baseline = best_of(
            repeat, "TLS 1.3 / TCP (asyncio)", "tls", {**across, **tls, "bytes": size}
        )
        quic = {**across, "engine": "qh3", "udp_io": "quinn"}
        results = [
            best_of(repeat, "QUIC qh3", "quic", {**quic, "bytes": size}),
            best_of(
                repeat, "QUIC aioquic", "quic", {**quic, "engine": "aioquic", "bytes": size // 8}
            ),
            baseline,
        ]
        loopback: Result | None = None
        if not missing_ssh:
            source = _random_file(tmp_path / "payload", size // 2)
            listen = (link.right_ip, "127.0.0.1")
            with Sshd.run(tmp_path / "ssh", link.right.prefix, listen) as sshd:
                results.append(
                    scp_result("scp", sshd, link.left.prefix, link.right_ip, source, repeat)
                )
                loopback = scp_result(
                    "scp, loopback", sshd, link.right.prefix, "127.0.0.1", source, repeat
                )
            source.unlink()

    print()
    print(
        f"veth pair, MTU {MTU}, two namespaces; {size >> 20} MiB per run (aioquic 1/8,"
        f" scp 1/2), best of {repeat}; each end in its own process"
    )
    print(table([*results, *([loopback] if loopback else [])], baseline, name_width=26))
    if missing_ssh:
        print(f"scp: not measured ({', '.join(missing_ssh)} missing: install openssh)")
    else:
        scp = results[-1]
        qh3 = results[0]
        print(
            f"qh3 vs scp on the veth: throughput x{qh3.megabytes_per_s / scp.megabytes_per_s:.2f},"
            f" CPU per GiB x{qh3.cpu_s_per_gib / scp.cpu_s_per_gib:.2f}"
        )
    report = {
        "benchmark": "netns",
        "link": {"kind": "veth", "mtu": MTU},
        "baseline": baseline.name,
        "repeat": repeat,
        "results": [as_json(r, baseline) for r in results],
        "loopback_scp": as_json(loopback, baseline) if loopback else None,
    }
    write_report(report, "netns.json")
    assert all(r.megabytes_per_s > 0 for r in results)
