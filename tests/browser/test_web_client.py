"""The reference web client in Debian's Chromium, through the real server and a real agent.

One browser, one server and one agent (``desk``) for the module; the page signs in once as
ann's device ``web``. Files go both ways over WebRTC DataChannels, a terminal is watched and
control is asked for, and strangers and bad input are refused with one clear message.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from tests.integration.harness import (
    AgentHome,
    Process,
    Server,
    Tmux,
    meshagent_cmd,
    run,
    wait_until,
)

from .conftest import PASSWORD, sign_in

pytestmark = pytest.mark.timeout(600)

MiB = 1024 * 1024


def new_page(context: Any, errors: list[str]) -> Any:
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("desk-downloads")


@pytest.fixture(scope="module")
def desk(web_server: Server, module_agents: Callable[..., AgentHome], downloads: Path) -> AgentHome:
    agent = module_agents("desk", **{"downloads.dir": str(downloads)})
    agent.login(web_server, web_server.join_code("ann"))
    return agent.up()


@pytest.fixture(scope="module")
def page_errors() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(
    chromium: Any, web_server: Server, desk: AgentHome, page_errors: list[str]
) -> Iterator[Any]:
    context = chromium.new_context(accept_downloads=True)
    page = new_page(context, page_errors)
    sign_in(page, web_server.url, "web")
    page.wait_for_selector("li.device.online[data-device] >> text=desk", timeout=30_000)
    page.uncheck("#ask-where")  # the picker cannot be driven headless: downloads stream to disk
    try:
        yield page
    finally:
        context.close()


def desk_send(desk: AgentHome, *args: str) -> tuple[threading.Thread, dict[str, Any]]:
    """``meshagent send ARGS --to web`` in a thread (it returns when the page is done)."""
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "done", run("--home", str(desk.home), "send", *args, "--to", "web", timeout=600)
        )
    )
    thread.start()
    return thread, result


def accept_download(page: Any, name: str) -> Path:
    row = page.locator("#incoming li.offer", has_text=name)
    row.wait_for(timeout=60_000)
    with page.expect_download(timeout=60_000) as info:
        row.locator(".accept").click()
    return Path(info.value.path())  # waits until the download is complete


def transfer_state(page: Any, name: str, timeout: float = 300_000) -> str:
    row = page.locator("#transfers li.transfer", has_text=name).first
    page.wait_for_function(
        "name => [...document.querySelectorAll('#transfers li.transfer')].some(li => "
        "li.textContent.includes(name) && /(done|failed|cancelled)/.test(li.className))",
        arg=name,
        timeout=timeout,
    )
    return str(row.locator(".state").inner_text())


def test_signs_in_sees_the_agent_online_and_a_reload_keeps_the_device(
    page: Any, desk: AgentHome
) -> None:
    row = page.locator("li.device", has_text="desk")
    assert "online" in row.inner_text()
    device_id = page.evaluate("mesh.session.deviceId")
    assert len(device_id) == 64
    [web] = [d for d in desk.devices() if d["name"] == "web"]
    assert web["id"] == device_id and web["platform"] == "browser" and web["online"]
    page.reload()
    page.wait_for_selector("li.device.online >> text=desk", timeout=30_000)
    assert page.evaluate("mesh.session.deviceId") == device_id  # its RTCCertificate was kept


def test_receives_100_mb_from_the_agent_with_its_digest_checked(
    page: Any, desk: AgentHome, tmp_path: Path, page_errors: list[str]
) -> None:
    source = tmp_path / "hundred.bin"
    with source.open("wb") as out:
        for _ in range(100):
            out.write(os.urandom(MiB))
    thread, result = desk_send(desk, str(source))
    saved = accept_download(page, "hundred.bin")
    assert "checked" in transfer_state(page, "hundred.bin")
    thread.join(120)
    assert result["done"].returncode == 0, result["done"].stderr
    assert blake3.blake3(saved.read_bytes()).digest() == blake3.blake3(source.read_bytes()).digest()
    assert not page_errors


def test_with_ask_where_the_file_is_written_where_the_user_picked(
    page: Any, desk: AgentHome, tmp_path: Path
) -> None:
    """The File System Access path: the picker is stood in for by a file of the page's private
    file system (a headless browser shows no dialog); the chunks go through its writable."""
    payload = os.urandom(2 * MiB + 9)
    source = tmp_path / "picked.bin"
    source.write_bytes(payload)
    page.evaluate(
        """() => { window.showSaveFilePicker = async ({ suggestedName }) =>
             (await navigator.storage.getDirectory())
               .getFileHandle(suggestedName, { create: true }); }"""
    )
    page.check("#ask-where")
    try:
        thread, result = desk_send(desk, str(source))
        row = page.locator("#incoming li.offer", has_text="picked.bin")
        row.wait_for(timeout=60_000)
        row.locator(".accept").click()
        assert "checked" in transfer_state(page, "picked.bin")
        thread.join(60)
        assert result["done"].returncode == 0, result["done"].stderr
        digest = page.evaluate(
            """async () => {
              const root = await navigator.storage.getDirectory();
              const file = await (await root.getFileHandle('picked.bin')).getFile();
              const sum = await crypto.subtle.digest('SHA-256', await file.arrayBuffer());
              return [...new Uint8Array(sum)].map(b => b.toString(16).padStart(2, '0')).join('');
            }"""
        )
        assert digest == hashlib.sha256(payload).hexdigest()
    finally:
        page.uncheck("#ask-where")


def test_sends_a_file_to_the_agent(page: Any, downloads: Path, tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB + 17)
    source = tmp_path / "from-the-page.bin"
    source.write_bytes(payload)
    page.locator("li.device", has_text="desk").locator(".pick-files").set_input_files(str(source))
    assert "checked by the device" in transfer_state(page, "from-the-page.bin")
    arrived = downloads / "from-the-page.bin"
    wait_until(arrived.exists, 10, "the file in desk's downloads")
    assert hashlib.sha256(arrived.read_bytes()).digest() == hashlib.sha256(payload).digest()


def test_a_file_dropped_on_the_agents_row_is_sent_to_it(page: Any, downloads: Path) -> None:
    drop = page.evaluate_handle(
        """() => {
          const transfer = new DataTransfer();
          const bytes = new Uint8Array(300000).map((_, i) => i % 251);
          transfer.items.add(new File([bytes], 'dropped.bin'));
          return transfer;
        }"""
    )
    row = page.locator("li.device", has_text="desk")
    row.dispatch_event("dragover", {"dataTransfer": drop})
    row.dispatch_event("drop", {"dataTransfer": drop})
    assert "checked by the device" in transfer_state(page, "dropped.bin")
    arrived = downloads / "dropped.bin"
    wait_until(arrived.exists, 10, "the dropped file in desk's downloads")
    assert arrived.read_bytes() == bytes(i % 251 for i in range(300000))


def test_a_send_cut_by_a_page_reload_resumes_when_the_same_file_is_sent_again(
    page: Any, downloads: Path, tmp_path: Path
) -> None:
    payload = os.urandom(24 * MiB)
    source = tmp_path / "resumable.bin"
    source.write_bytes(payload)
    desk_row = page.locator("li.device", has_text="desk")
    desk_row.locator(".pick-files").set_input_files(str(source))
    page.wait_for_function(
        "() => mesh.transfers.some(t => t.name === 'resumable.bin' && t.bytes > 8 * 2**20)",
        timeout=120_000,
    )
    page.reload()  # the page and its connection are gone mid-transfer
    page.wait_for_selector("li.device.online >> text=desk", timeout=30_000)
    page.uncheck("#ask-where")
    page.locator("li.device", has_text="desk").locator(".pick-files").set_input_files(str(source))
    state = transfer_state(page, "resumable.bin")
    assert "checked by the device" in state
    assert "resumed" in state  # the chunks the agent kept were not sent again
    arrived = downloads / "resumable.bin"
    wait_until(arrived.exists, 10, "the file in desk's downloads")
    assert hashlib.sha256(arrived.read_bytes()).digest() == hashlib.sha256(payload).digest()


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": os.urandom(2 * MiB + 3),
        "sub/deeper/c.txt": b"gamma " * 1000,
        "empty.txt": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_receives_a_folder_as_a_zip_that_unpacks_identical(
    page: Any, desk: AgentHome, tmp_path: Path
) -> None:
    folder = tmp_path / "album"
    files = make_tree(folder)
    thread, result = desk_send(desk, str(folder))
    saved = accept_download(page, "album.zip")
    assert "checked" in transfer_state(page, "album.zip")
    thread.join(60)
    assert result["done"].returncode == 0, result["done"].stderr
    with zipfile.ZipFile(io.BytesIO(saved.read_bytes())) as archive:
        assert archive.testzip() is None
        unpacked = {
            info.filename.removeprefix("album/"): archive.read(info)
            for info in archive.infolist()
            if not info.is_dir()
        }
    assert unpacked == files


def test_sends_a_folder_to_the_agent(page: Any, downloads: Path, tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    files = make_tree(folder)
    page.locator("li.device", has_text="desk").locator(".pick-folder").set_input_files(str(folder))
    assert "checked by the device" in transfer_state(page, "outbox")
    for name, data in files.items():
        arrived = downloads / "outbox" / name
        wait_until(arrived.exists, 10, f"{name} in desk's downloads")
        assert arrived.read_bytes() == data


def test_the_page_cancels_a_receive_and_the_agent_is_told(
    page: Any, desk: AgentHome, tmp_path: Path
) -> None:
    source = tmp_path / "long.bin"
    source.write_bytes(os.urandom(32 * MiB))
    thread, result = desk_send(desk, str(source))
    row = page.locator("#incoming li.offer", has_text="long.bin")
    row.wait_for(timeout=60_000)
    with page.expect_download(timeout=60_000):
        row.locator(".accept").click()
    transfer = page.locator("#transfers li.transfer", has_text="long.bin").first
    page.wait_for_function(
        "() => [...document.querySelectorAll('#transfers li.transfer')].some(li => "
        "li.textContent.includes('long.bin') && li.querySelector('progress').value > 0.01)",
        timeout=60_000,
    )
    transfer.locator(".cancel").click()
    assert transfer_state(page, "long.bin").startswith("Cancelled")
    thread.join(60)
    assert result["done"].returncode != 0
    assert "cancel" in (result["done"].stdout + result["done"].stderr).lower()


# ------------------------------------------------------------------ terminal

SHELL = ["bash", "--norc", "--noprofile"]
SHELL_ENV = {"PS1": "prompt> ", "HISTFILE": "/dev/null"}


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux")
    consoles = Tmux(tmp_path / "tmux.sock")
    try:
        yield consoles
    finally:
        consoles.kill()


def test_watches_a_terminal_and_is_refused_control_until_the_host_grants_it(
    page: Any, desk: AgentHome, tmux: Tmux
) -> None:
    tmux.start(
        "host",
        meshagent_cmd("--home", str(desk.home), "terminal", "share", "--", *SHELL),
        env=SHELL_ENV,
    )
    tmux.wait_for("host", "prompt>")
    watch = page.locator("li.device", has_text="desk").locator(".watch")
    watch.wait_for(timeout=30_000)
    watch.click()
    state = page.locator("#terminal-state")
    page.wait_for_function("() => mesh.terminalText().includes('prompt>')", timeout=30_000)
    assert state.inner_text().startswith("View only")

    word = f"from-the-host-{secrets.token_hex(4)}"
    tmux.type("host", f"echo {word}", enter=True)
    page.wait_for_function("w => mesh.terminalText().split(w).length > 2", arg=word, timeout=30_000)

    # View only: what the page types never reaches the PTY.
    page.locator("#terminal").click()
    page.keyboard.type("echo typed-while-viewing\n")
    mark = f"mark-{secrets.token_hex(4)}"
    tmux.type("host", f"echo {mark}", enter=True)
    tmux.wait_for("host", f"\n{mark}")
    assert "typed-while-viewing" not in tmux.screen("host")

    # Asking: the host's user is asked; "n" refuses, the page says so.
    page.click("#terminal-control")
    wait_until(lambda: "asks to take control" in tmux.title("host"), 20, "the host's question")
    tmux.type("host", "n")
    page.wait_for_function(
        "() => document.querySelector('#terminal-state').textContent.startsWith('Control refused')",
        timeout=20_000,
    )
    # Asking again; "y" grants; the page types into the shared shell.
    page.click("#terminal-control")
    wait_until(
        lambda: "asks to take control" in tmux.title("host"), 20, "the host's second question"
    )
    tmux.type("host", "y")
    page.wait_for_function(
        "() => document.querySelector('#terminal-state').textContent"
        " === 'You control this terminal'",
        timeout=20_000,
    )
    typed = f"from-the-page-{secrets.token_hex(4)}"
    page.locator("#terminal").click()
    page.keyboard.type(f"echo {typed}\n")
    screen = tmux.wait_for("host", f"\n{typed}")
    assert screen.count(typed) == 2
    # The command ends: the page is told.
    tmux.type("host", "exit 3", enter=True)
    page.wait_for_function(
        "() => document.querySelector('#terminal-state').textContent.includes('ended')",
        timeout=20_000,
    )
    assert "exit 3" in state.inner_text()


def test_a_viewer_in_the_room_watches_but_the_server_refuses_it_control(
    chromium: Any, web_server: Server, desk: AgentHome, tmux: Tmux
) -> None:
    """bob is in ann's room `team` as a viewer: his page sees the shared terminal, and asking
    for control is refused by the server (his role), with one clear message; the host is
    never asked."""
    web_server.add_user("bob", PASSWORD)
    desk.ok("rooms", "create", "team")
    code = desk.ok("--json", "rooms", "join-code", "team")
    code = re.search(r"[0-9A-Z]{4}(?:-[0-9A-Z]{4}){3}", code).group(0)  # type: ignore[union-attr]
    context = chromium.new_context()
    try:
        bob = context.new_page()
        sign_in(bob, web_server.url, "bob-web", user="bob")
        bob.wait_for_selector("#home:not([hidden])", timeout=30_000)
        joined = bob.evaluate(
            "code => mesh.session.call('POST', '/rooms/join', { code }).then(r => r.name)", code
        )
        assert joined == "team"
        desk.ok("rooms", "role", "team", "bob", "viewer")
        tmux.start(
            "host",
            meshagent_cmd(
                "--home", str(desk.home), "terminal", "share", "--room", "team", "--", *SHELL
            ),
            env=SHELL_ENV,
        )
        tmux.wait_for("host", "prompt>")
        bob.reload()
        watch = bob.locator("li.device", has_text="desk").locator(".watch")
        watch.wait_for(timeout=30_000)
        watch.click()
        bob.wait_for_function("() => mesh.terminalText().includes('prompt>')", timeout=30_000)
        bob.click("#terminal-control")
        bob.wait_for_function(
            "() => document.querySelector('#terminal-state').textContent"
            ".startsWith('Control refused')",
            timeout=20_000,
        )
        assert "does not allow" in bob.inner_text("#terminal-state")
        assert "asks to take control" not in tmux.title("host")
    finally:
        context.close()


# ------------------------------------------------------------------ strangers and bad input


def test_a_wrong_password_and_a_spent_join_code_each_get_one_clear_message(
    chromium: Any, web_server: Server
) -> None:
    context = chromium.new_context()
    errors: list[str] = []
    try:
        page = new_page(context, errors)
        sign_in(page, web_server.url, "guess", password="wrong")
        page.wait_for_function("() => document.querySelector('#login-error').textContent")
        assert page.inner_text("#login-error") == "Wrong user name or password."
        code = web_server.join_code("ann")
        page.fill("#login-code [name=join_code]", code)
        page.click("#login-code button")
        page.wait_for_selector("#home:not([hidden])", timeout=30_000)
        other = chromium.new_context()
        try:
            again = new_page(other, errors)
            again.goto(web_server.url + "/app/")
            again.fill("#login-code [name=join_code]", code)
            again.click("#login-code button")
            again.wait_for_function("() => document.querySelector('#login-error').textContent")
            assert again.inner_text("#login-error") == "That join code was used already."
        finally:
            other.close()
    finally:
        context.close()
    assert not errors


def test_a_stranger_sees_no_device_and_gets_no_token_for_the_agent(
    chromium: Any, web_server: Server, desk: AgentHome
) -> None:
    web_server.add_user("mallory", PASSWORD)
    desk_id = next(d["id"] for d in desk.devices() if d["name"] == "web")  # any of ann's ids
    context = chromium.new_context()
    try:
        page = context.new_page()
        sign_in(page, web_server.url, "mallory-web", user="mallory")
        page.wait_for_selector("#no-devices:not([hidden])", timeout=30_000)
        answer = page.evaluate(
            "id => mesh.session.capability(id, 'p2p:connect').then(() => 'granted', e => e.code)",
            desk_id,
        )
        assert answer == "unknown_device"
    finally:
        context.close()


# ------------------------------------------------------------------ share links


def test_a_share_link_gives_someone_without_an_account_the_file_once(
    chromium: Any, desk: AgentHome, tmp_path: Path
) -> None:
    payload = os.urandom(5 * MiB + 1)
    source = tmp_path / "for-a-friend.bin"
    source.write_bytes(payload)
    sender = Process(
        ["--home", str(desk.home), "send", str(source), "--link", "--ttl", "300"],
        tmp_path / "send-link.log",
    )
    context = chromium.new_context(accept_downloads=True)
    errors: list[str] = []
    try:
        url = sender.read_line(r"(https?://\S+/s/\S+#\S+)", timeout=30).group(1)
        friend = new_page(context, errors)
        friend.goto(url)
        friend.wait_for_function(
            "() => document.querySelector('#share-what').textContent.includes('for-a-friend.bin')",
            timeout=30_000,
        )
        assert friend.evaluate("location.hash") == ""  # the secret left the address bar
        offer = friend.locator("#share-transfers li.offer")
        offer.wait_for(timeout=60_000)
        with friend.expect_download(timeout=60_000) as info:
            offer.locator(".accept").click()
        saved = Path(info.value.path())
        friend.wait_for_function(
            "() => document.querySelector('#share-transfers li.transfer.done')", timeout=120_000
        )
        assert saved.read_bytes() == payload
        assert sender.proc.wait(60) == 0

        # The link is spent; a wrong secret is no better.
        again = new_page(context, errors)
        again.goto(url)
        again.wait_for_function("() => document.querySelector('#share-error').textContent")
        assert "used already" in again.inner_text("#share-error")
        forged = new_page(context, errors)
        forged.goto(url.split("#")[0] + "#" + secrets.token_urlsafe(24))
        forged.wait_for_function("() => document.querySelector('#share-error').textContent")
        assert "not valid" in forged.inner_text("#share-error")
    finally:
        sender.stop()
        context.close()
    assert not errors


def test_the_page_checks_a_tokens_signature_and_claims_before_answering(
    page: Any, desk: AgentHome
) -> None:
    """What the page does with an agent's offer: a token from the server verifies (Ed25519 in
    WebCrypto); the same token altered, or aimed at another device, does not."""
    desk_id = page.evaluate("[...mesh.devices.values()].find(d => d.name === 'desk').id")
    outcome = page.evaluate(
        """async deskId => {
          const { checkToken } = await import('/app/js/peer.js');
          const s = mesh.session;
          const token = await s.capability(deskId, 'p2p:connect');
          const expect = { keys: s.state.keys, serverId: s.state.server_id, audience: deskId,
                           subject: s.deviceId };
          const verdict = (t, e) => checkToken(t, e).then(() => 'ok', err => err.message);
          const [head, body, sig] = token.split('.');
          const flipped = sig.slice(0, 10) + (sig[10] === 'A' ? 'B' : 'A') + sig.slice(11);
          return {
            good: await verdict(token, expect),
            forged: await verdict([head, body, flipped].join('.'), expect),
            elsewhere: await verdict(token, { ...expect, audience: s.deviceId }),
            stolen: await verdict(token, { ...expect, subject: deskId }),
            garbage: await verdict('not.a.token', expect),
          };
        }""",
        desk_id,
    )
    assert outcome == {
        "good": "ok",
        "forged": "bad signature",
        "elsewhere": "wrong audience",
        "stolen": "wrong holder",
        "garbage": "not a token",
    }
