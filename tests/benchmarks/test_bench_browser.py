"""The web client's throughput and memory, in Debian's Chromium (run with -m benchmark -s).

Same run, same machine, same file size:

- agent -> browser: ``meshagent send --to <page>`` over WebRTC (aiortc's SCTP on the agent's
  side, Chromium's native one on the page's), the page streaming to disk;
- browser -> browser: two Chromium pages (both sides native SCTP, the protocol in JS);
- agent -> agent over QUIC: the agents' own path, the baseline.

And the page's memory (JS heap, and the RSS of every Chromium process) sampled during a big
receive (``MESHAGENT_BENCH_BROWSER_BIG_MB``, default 1024): it must stay flat, since nothing
holds the file. ``MESHAGENT_BENCH_BROWSER_MB`` (default 64) sizes the throughput runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.benchmarks._measure import write_report
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, PASSWORD, chromium_missing, sign_in
from tests.integration.harness import AgentHome, Server, agent_homes, run, wait_until

MiB = 1024 * 1024
SIZE_MB = int(os.environ.get("MESHAGENT_BENCH_BROWSER_MB", "64"))
BIG_MB = int(os.environ.get("MESHAGENT_BENCH_BROWSER_BIG_MB", "1024"))


def _file(path: Path, mib: int) -> Path:
    block = os.urandom(MiB)
    with path.open("wb") as out:
        for _ in range(mib):
            out.write(block)
    return path


def _sign_in(context: Any, url: str, name: str) -> Any:
    page = context.new_page()
    sign_in(page, url, name)
    page.wait_for_selector("li.device.online >> text=desk", timeout=30_000)
    page.uncheck("#ask-where")
    return page


# The floor for the browser rows: Chromium's own DataChannel, two peer connections in one page,
# 64 KiB messages with the same bufferedAmount backpressure as the client, nothing on top.
BARE_DATACHANNEL = """async (mib) => {
  const a = new RTCPeerConnection(), b = new RTCPeerConnection();
  a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
  b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
  const channel = a.createDataChannel("bare", { ordered: true });
  const total = mib * 1048576;
  let got = 0;
  const done = new Promise((resolve) => { b.ondatachannel = (e) => {
    e.channel.binaryType = "arraybuffer";
    e.channel.onmessage = (m) => { got += m.data.byteLength; if (got >= total) resolve(); };
  }; });
  await a.setLocalDescription(); await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription(); await a.setRemoteDescription(b.localDescription);
  await new Promise((resolve) => { channel.onopen = resolve; });
  const block = new Uint8Array(65536);
  channel.bufferedAmountLowThreshold = 512 * 1024;
  const started = performance.now();
  for (let sent = 0; sent < total; sent += block.length) {
    if (channel.bufferedAmount > 1048576) {
      await new Promise((resolve) => { channel.onbufferedamountlow = resolve; });
    }
    channel.send(block);
  }
  await done;
  a.close(); b.close();
  return total / 1e6 / ((performance.now() - started) / 1000);
}"""


def _cli_rate(output: str) -> float:
    """MB/s from ``sent NAME to PEER: 64.0 MB in 3.2 s ...``."""
    match = re.search(r"([\d.]+) MB in ([\d.]+) s", output)
    assert match, output
    return float(match.group(1)) / float(match.group(2))


def _receive(page: Any, agent: AgentHome, source: Path, to: str, sample: Any = None) -> str:
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "done", run("--home", str(agent.home), "send", str(source), "--to", to, timeout=3600)
        )
    )
    thread.start()
    row = page.locator("#incoming li.offer", has_text=source.name)
    row.wait_for(timeout=60_000)
    with page.expect_download(timeout=60_000) as info:
        row.locator(".accept").click()
    while thread.is_alive():
        if sample is not None:
            sample()
        thread.join(0.25)
    done = result["done"]
    assert done.returncode == 0, done.stderr
    assert Path(info.value.path()).stat().st_size == source.stat().st_size
    return str(done.stdout)


def _page_rate(page: Any, name: str) -> float:
    seconds = page.evaluate(
        "name => { const r = mesh.transfers.filter(t => t.name === name).at(-1);"
        " return (r.finished - r.started) / 1000; }",
        name,
    )
    return SIZE_MB * MiB / 1e6 / float(seconds)


@pytest.mark.benchmark
def test_browser_throughput_and_memory_against_quic() -> None:
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="bench-browser-"))
    (root / "logs").mkdir()
    server = Server(root / "server", root / "logs").start()
    stack = contextlib.ExitStack()  # stops the agents first, then the server
    try:
        make_agent = stack.enter_context(agent_homes(root))
        server.add_user("ann", PASSWORD)
        agents: list[AgentHome] = []
        for name in ("desk", "lap"):
            agent = make_agent(name, **{"downloads.dir": str(root / f"{name}-in")})
            agent.login(server, server.join_code("ann"))
            agents.append(agent.up())
        desk = agents[0]
        wait_until(lambda: "lap" in desk.online(), 15, "lap online")
        source = _file(root / "bench.bin", SIZE_MB)
        warm = _file(root / "warm.bin", 1)
        rates: dict[str, float] = {}

        # agent -> agent, QUIC (warm the connection first)
        desk.ok("send", str(warm), "--to", "lap")
        over_quic = run("--home", str(desk.home), "send", str(source), "--to", "lap", timeout=600)
        assert over_quic.returncode == 0, over_quic.stderr
        rates["agent -> agent (QUIC)"] = _cli_rate(over_quic.stdout)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            one = _sign_in(browser.new_context(accept_downloads=True), server.url, "web1")
            two = _sign_in(browser.new_context(accept_downloads=True), server.url, "web2")

            # agent -> browser, WebRTC
            _receive(one, desk, warm, "web1")
            out = _receive(one, desk, source, "web1")
            rates["agent -> browser (WebRTC)"] = _cli_rate(out)
            rates["agent -> browser, page's clock"] = _page_rate(one, source.name)

            # browser -> browser, WebRTC, both sides native
            two_id = two.evaluate("mesh.session.deviceId")
            make = (
                "async ([id, name, mib]) => { const block = new Uint8Array(1 << 20);"
                " for (let i = 0; i < block.length; i += 65536)"
                " crypto.getRandomValues(block.subarray(i, i + 65536));"
                " const file = new File(Array(mib).fill(block), name);"
                " mesh.sendTo(id, [{ file, path: name }]); }"
            )
            for name, mib in (("warm-bb.bin", 1), ("bench-bb.bin", SIZE_MB)):
                one.evaluate(make, [two_id, name, mib])
                row = two.locator("#incoming li.offer", has_text=name)
                row.wait_for(timeout=60_000)
                with two.expect_download(timeout=60_000) as info:
                    row.locator(".accept").click()
                info.value.path()
                one.wait_for_function(
                    "name => mesh.transfers.some(t => t.name === name && t.state === 'done')",
                    arg=name,
                    timeout=600_000,
                )
            rates["browser -> browser (WebRTC)"] = _page_rate(one, "bench-bb.bin")
            rates["bare DataChannel, in one page"] = float(two.evaluate(BARE_DATACHANNEL, SIZE_MB))

            # the page's memory while it receives a big file
            big = _file(root / "big.bin", BIG_MB)
            cdp = one.context.new_cdp_session(one)
            cdp.send("Performance.enable")
            peaks = {"js_heap_mb": 0.0, "chromium_rss_mb": 0.0}

            def sample() -> None:
                metrics = {
                    m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]
                }
                heap = metrics.get("JSHeapUsedSize", 0) / MiB
                rss = (
                    sum(
                        p.memory_info().rss
                        for p in psutil.Process().children(recursive=True)
                        if "chrom" in p.name()
                    )
                    / MiB
                )
                peaks["js_heap_mb"] = max(peaks["js_heap_mb"], heap)
                peaks["chromium_rss_mb"] = max(peaks["chromium_rss_mb"], rss)

            sample()
            before = dict(peaks)
            started = time.perf_counter()
            _receive(one, desk, big, "web1", sample)
            big_seconds = time.perf_counter() - started
            browser.close()

        quic = rates["agent -> agent (QUIC)"]
        report = {
            "benchmark": "browser",
            "size_mb": SIZE_MB,
            "rates_mb_s": rates,
            "ratios_to_quic": {k: v / quic for k, v in rates.items()},
            "big_receive": {
                "mb": BIG_MB,
                "seconds": big_seconds,
                "before": before,
                "peak": peaks,
            },
            "machine": f"{os.cpu_count()} cores, loaded: {os.getloadavg()[0]:.1f} (1 min)",
        }
        write_report(report, "browser.json")
        lines = [f"{k:34} {v:8.1f} MB/s  x{v / quic:.3f} of QUIC" for k, v in rates.items()]
        lines.append(
            f"page memory during a {BIG_MB} MiB receive ({big_seconds:.0f} s): JS heap"
            f" {before['js_heap_mb']:.0f} -> peak {peaks['js_heap_mb']:.0f} MiB, Chromium RSS"
            f" {before['chromium_rss_mb']:.0f} -> peak {peaks['chromium_rss_mb']:.0f} MiB"
        )
        print("\n".join(lines))
        # Nothing holds the file: the heap stays far below what was received.
        assert peaks["js_heap_mb"] < before["js_heap_mb"] + 64
        assert all(v > 0 for v in rates.values())
    finally:
        stack.close()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)  # a GiB of test files
