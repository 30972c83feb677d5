"""Real-world paths through the user-space link emulator (linkemu.py), issue 18's table.

First the emulator itself is checked: a TCP echo must see the configured RTT and a TCP sink the
rate limit, and its ceiling (no delay, no limit) is printed, so a figure near it is known to be
the emulator's. Then, in the same run over the same emulated link, our QUIC endpoint carrying a
stream (as ``send`` carries a file) against TCP with BBR, TCP forced to CUBIC and scp.

    pytest -m benchmark tests/benchmarks/test_bench_paths.py -s        (as root, with ethtool)
    MESHAGENT_BENCH_PATH_BYTES=33554432   bytes per bulk run (default 32 MiB; scp too)
    MESHAGENT_BENCH_RELAY_BYTES=134217728 bytes per relay/direct run (default 128 MiB, loopback)
    MESHAGENT_BENCH_REPEAT=1              interleaved rounds (median of each)
    MESHAGENT_BENCH_OUT=results.json      also write the results as JSON (paths.json)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from ._measure import write_report
from ._path_support import CHUNK, quic_in_process, quic_over_websocket_relay, run_pair
from .linkemu import EmulatedLink, LinkProfile, unavailable
from .test_bench_netns import Sshd, _random_file, scp_result

ECHO_COUNT: Final = 50
LOSSY: Final = LinkProfile(delay_ms=25, loss=0.005, rate_mbit=200)
FAST: Final = LinkProfile(delay_ms=10, rate_mbit=1000)
CEILING: Final = LinkProfile()


def _skip_unless_possible() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)


def _bytes() -> int:
    return int(os.environ.get("MESHAGENT_BENCH_PATH_BYTES", 32 * CHUNK)) // CHUNK * CHUNK


def _repeat() -> int:
    return int(os.environ.get("MESHAGENT_BENCH_REPEAT", "1"))


def echo_rtts_ms(link: EmulatedLink, count: int = ECHO_COUNT) -> list[float]:
    args = {"listener_ip": link.right_ip, "count": count}
    sent, _ = run_pair("echo", link.right.prefix, link.left.prefix, args, timeout=120)
    return [rtt * 1000 for rtt in sent["rtts"]]


def tcp_mb_per_s(link: EmulatedLink, size: int, congestion: str) -> float:
    args = {"listener_ip": link.right_ip, "bytes": size, "congestion": congestion}
    sent, received = run_pair("tcp", link.right.prefix, link.left.prefix, args)
    assert received["received"] == size
    return float(size / sent["elapsed"] / 1e6)


def quic_mb_per_s(link: EmulatedLink, size: int) -> float:
    args = {"listener_ip": link.right_ip, "dialer_ip": link.left_ip, "bytes": size}
    sent, received = run_pair("quic", link.right.prefix, link.left.prefix, args)
    assert received["received"] == size
    return float(size / sent["elapsed"] / 1e6)


@pytest.mark.benchmark
def test_the_emulated_link_has_its_delay_rate_and_loss() -> None:
    _skip_unless_possible()
    size = _bytes()
    with EmulatedLink.build(CEILING) as link:
        ceiling_rtt = statistics.median(echo_rtts_ms(link))
        ceiling = tcp_mb_per_s(link, size, "cubic")
    profile = LinkProfile(delay_ms=25, rate_mbit=100)
    with EmulatedLink.build(profile) as link:
        assert f"mtu {1500} " in link.left.ip("link", "show", "eth0")
        rtts = echo_rtts_ms(link)
        limited = tcp_mb_per_s(link, size, "bbr")
    p50 = statistics.median(rtts)
    print(
        f"\nemulator ceiling (no delay, no limit): TCP {ceiling:.1f} MB/s, echo p50"
        f" {ceiling_rtt:.2f} ms; {profile.describe()}: echo p50 {p50:.2f} ms"
        f" (min {min(rtts):.2f}), TCP BBR {limited:.1f} MB/s of {profile.rate_mbit / 8:.1f}"
    )
    assert profile.rtt_ms <= min(rtts) and p50 < profile.rtt_ms + 5
    assert limited <= profile.rate_mbit / 8 * 1.02  # the limit holds
    assert limited >= profile.rate_mbit / 8 * 0.5  # and the link can fill it


def _round(measures: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Median of ``repeat`` interleaved rounds of every measure."""
    runs: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeat):
        for name, measure in measures.items():
            runs[name].append(measure())
    return {name: statistics.median(values) for name, values in runs.items()}


def _path_rows(tmp_path: Path, profile: LinkProfile, with_scp: bool) -> dict[str, float]:
    size = _bytes()
    with EmulatedLink.build(profile) as link:
        measures: dict[str, Callable[[], float]] = {
            "send (QUIC qh3 stream)": lambda: quic_mb_per_s(link, size),
            "TCP BBR": lambda: tcp_mb_per_s(link, size, "bbr"),
            "TCP CUBIC": lambda: tcp_mb_per_s(link, size, "cubic"),
        }
        if not with_scp or shutil.which("sshd") is None:
            return _round(measures, _repeat())
        source = _random_file(tmp_path / "payload", size)
        with Sshd.run(tmp_path / "ssh", link.right.prefix, (link.right_ip,)) as sshd:

            def scp() -> float:
                result = scp_result("scp", sshd, link.left.prefix, link.right_ip, source, 1)
                return result.megabytes_per_s

            return _round({**measures, "scp": scp}, _repeat())


def _print_rows(title: str, rows: dict[str, float], against: str) -> None:
    print(f"\n{title}")
    for name, rate in rows.items():
        print(f"  {name:<24} {rate:8.2f} MB/s   x{rate / rows[against]:.2f} of {against}")


@pytest.mark.benchmark
@pytest.mark.timeout(3600)
@pytest.mark.parametrize(
    ("name", "link", "with_scp", "against"),
    [("lossy", LOSSY, True, "TCP BBR"), ("fast", FAST, False, "TCP CUBIC")],
    ids=["lossy-against-tcp-and-scp", "fast-against-tcp"],
)
def test_a_link_against_tcp(
    tmp_path: Path, name: str, link: LinkProfile, with_scp: bool, against: str
) -> None:
    _skip_unless_possible()
    rows = _path_rows(tmp_path, link, with_scp=with_scp)
    _print_rows(link.describe(), rows, against)
    write_report(
        {"benchmark": f"paths-{name}", "link": link.describe(), "MB/s": rows},
        f"paths-{name}.json",
    )
    assert all(rate > 0 for rate in rows.values())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[14 - 3]) + int(fields[15 - 3])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.benchmark
@pytest.mark.timeout(3600)
def test_relay_through_turn_against_direct(tmp_path: Path) -> None:
    """QUIC through coturn (both ends' allocations, loopback) against the same QUIC direct
    (loopback's jumbo datagrams, and the 1,452 bytes of any other path, which the relay keeps),
    interleaved rounds; agent CPU (both ends, one process) and coturn's CPU per GiB."""
    from tests.integration.test_turn import Coturn

    if shutil.which("turnserver") is None:
        pytest.skip("needs coturn (apt-get install coturn)")
    size = int(os.environ.get("MESHAGENT_BENCH_RELAY_BYTES", 128 * CHUNK)) // CHUNK * CHUNK
    gib = size / (1 << 30)
    runs: dict[str, list[dict[str, float]]] = {
        "direct": [],
        "direct, 1452 B": [],
        "TURN (coturn)": [],
    }
    with Coturn.run(tmp_path / "coturn") as turn:
        for _ in range(max(_repeat(), 3)):
            runs["direct"].append(asyncio.run(quic_in_process(size, None)))
            runs["direct, 1452 B"].append(asyncio.run(quic_in_process(size, None, jumbo=False)))
            before = _cpu_seconds(turn.process.pid)
            result = asyncio.run(quic_in_process(size, (turn.port, turn.secret)))
            result["relay_cpu"] = _cpu_seconds(turn.process.pid) - before
            runs["TURN (coturn)"].append(result)
    rows = {
        name: {key: statistics.median(run[key] for run in values) for key in values[0]}
        for name, values in runs.items()
    }
    direct = rows["direct"]["mb_per_s"]
    print(f"\nrelay vs direct, loopback, {size >> 20} MiB, median of {len(runs['direct'])} rounds")
    for name, row in rows.items():
        relay_cpu = row.get("relay_cpu")
        relay = f", relay {relay_cpu / gib:.1f} CPU-s/GiB" if relay_cpu is not None else ""
        print(
            f"  {name:<16} {row['mb_per_s']:8.1f} MB/s  x{row['mb_per_s'] / direct:.2f} of direct;"
            f" agents {row['cpu'] / gib:.1f} CPU-s/GiB{relay}"
        )
    write_report({"benchmark": "relay-turn", "bytes": size, "rows": rows}, "paths-relay.json")
    assert all(row["mb_per_s"] > 0 for row in rows.values())


@pytest.mark.benchmark
@pytest.mark.timeout(3600)
def test_websocket_relay_batched_against_single_frames_and_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last-resort relay (the Mesh Server's WebSocket, a real ``meshagent server``
    process): batch frames against one frame per datagram (as before) and direct, interleaved
    rounds; this process's CPU (both agents' ends) and the server's per GiB. The server's
    per-device relay budget (16 MiB/s) caps the rate: the CPU per GiB is the comparison."""
    from tests.integration.harness import AgentHome, Server

    monkeypatch.setenv("MESHAGENT_SECRET_STORE", "file")  # the homes' tokens, in process
    size = int(os.environ.get("MESHAGENT_BENCH_WS_RELAY_BYTES", 64 * CHUNK)) // CHUNK * CHUNK
    gib = size / (1 << 30)
    logs = tmp_path / "logs"
    logs.mkdir()
    server = Server(tmp_path / "server", logs).start()
    try:
        server.add_user("ann")
        homes = []
        for name in ("listener", "dialer"):
            home = AgentHome(tmp_path / name, logs, name, config={"device.name": name})
            home.login(server, server.join_code("ann"))
            homes.append(home.home)
        assert server.process is not None
        pid = server.process.proc.pid
        runs: dict[str, list[dict[str, float]]] = {
            "direct, 1452 B": [],
            "WS relay, single": [],
            "WS relay, batched": [],
        }
        for _ in range(max(_repeat(), 3)):
            runs["direct, 1452 B"].append(asyncio.run(quic_in_process(size, None, jumbo=False)))
            for name, batch in (("WS relay, single", False), ("WS relay, batched", True)):
                before = _cpu_seconds(pid)
                result = asyncio.run(quic_over_websocket_relay(size, homes, batch=batch))
                result["relay_cpu"] = _cpu_seconds(pid) - before
                runs[name].append(result)
    finally:
        server.stop()
    rows = {
        name: {key: statistics.median(run[key] for run in values) for key in values[0]}
        for name, values in runs.items()
    }
    direct = rows["direct, 1452 B"]["mb_per_s"]
    print(f"\nWebSocket relay, loopback, {size >> 20} MiB, median of {len(runs['direct, 1452 B'])}")
    for name, row in rows.items():
        relay_cpu = row.get("relay_cpu")
        relay = f", server {relay_cpu / gib:.1f} CPU-s/GiB" if relay_cpu is not None else ""
        if "datagrams_per_frame" in row:
            relay += f", {row['datagrams_per_frame']:.1f} datagrams a frame (dialer)"
        print(
            f"  {name:<18} {row['mb_per_s']:8.1f} MB/s  x{row['mb_per_s'] / direct:.2f} of direct;"
            f" agents {row['cpu'] / gib:.1f} CPU-s/GiB{relay}"
        )
    write_report({"benchmark": "relay-websocket", "bytes": size, "rows": rows}, "paths-ws.json")
    assert all(row["mb_per_s"] > 0 for row in rows.values())
