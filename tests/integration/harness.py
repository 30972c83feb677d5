"""Real processes for integration tests: the reference server and agents, each its own --home."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meshagent_gui.config import KEYS, Config, Paths, parse_value
from meshagent_gui.server import runner

T = TypeVar("T")

BASE_ENV = {
    **os.environ,
    "MESHAGENT_SECRET_STORE": "file",
    "PYTHONUNBUFFERED": "1",
    "PYTHONWARNINGS": "error::RuntimeWarning",
}


def meshagent_cmd(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    """``prefix`` wraps the command, e.g. ``ip netns exec NS`` to run it in a namespace."""
    return [*prefix, sys.executable, "-m", "meshagent_gui", *args]


def run(
    *args: str,
    stdin: str | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        meshagent_cmd(*args, prefix=prefix),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**BASE_ENV, **(env or {})},
        check=False,
    )


def ok(*args: str, stdin: str | None = None) -> str:
    done = run(*args, stdin=stdin)
    assert done.returncode == 0, f"meshagent {' '.join(args)} failed: {done.stderr}"
    return done.stdout


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (right now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(probe: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll until probe() is truthy; its last value on success."""
    deadline = time.monotonic() + timeout
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
        last = probe()
    return last


class Process:
    """A long-running meshagent process whose output we read line by line."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            meshagent_cmd(*args, prefix=prefix),
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**BASE_ENV, **(env or {})},
            start_new_session=True,
        )

    def read_line(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        buffer = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read()
            if chunk:
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if match := re.search(pattern, line):
                        return match
            elif self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no line matching {pattern!r} from meshagent {' '.join(self.args)}; got {buffer!r};"
            f" stderr: {self.log_path.read_text(errors='replace')[-2000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self._log.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class Server:
    data_dir: Path
    logs: Path
    port: int = 0
    url: str = ""
    process: Process | None = None
    host: str | None = None  # None: the server's default (loopback)
    prefix: Sequence[str] = ()
    extra_args: Sequence[str] = ()  # more `meshagent server` options, e.g. --turn-url

    def start(self) -> Server:
        where = ["--host", self.host, "--insecure"] if self.host else []
        self.process = Process(
            [
                "server",
                *where,
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--heartbeat",
                "2",
                *self.extra_args,
            ],
            self.logs / f"server-{time.monotonic_ns()}.log",
            prefix=self.prefix,
        )
        self.url = self.process.read_line(r"listening on (\S+)").group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.stop(sig)
            self.process = None

    # The operator's commands (`meshagent server add-user` / `join-code`) run in process here:
    # setup for most tests, a process each otherwise; test_readme and test_cli_* run the real
    # commands.
    def add_user(
        self, name: str, password: str = "correct horse battery", admin: bool = False
    ) -> None:
        runner.add_user(self.data_dir, name, password, admin=admin)

    def join_code(self, user: str | None = None, ttl: int = 600, room: str | None = None) -> str:
        code, _expires = runner.create_join_code(self.data_dir, user=user, room=room, ttl=ttl)
        return code


@dataclass
class AgentHome:
    home: Path
    logs: Path
    name: str
    process: Process | None = None
    config: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    prefix: Sequence[str] = ()

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run("--home", str(self.home), *args, stdin=stdin, env=self.env, prefix=self.prefix)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        done = self.cli(*args, stdin=stdin)
        assert done.returncode == 0, f"meshagent {' '.join(args)} failed: {done.stderr}"
        return done.stdout

    def configure(self) -> None:
        """Write ``config`` the way `meshagent config set` does, without a process per key
        (setup, not what the tests are about; `config set` itself has its own tests)."""
        paths = Paths.resolve(self.home)
        paths.ensure()
        config = Config.load(paths.config_file)
        for name, raw in self.config.items():
            key = KEYS[name]
            if key.secret:
                self.ok("config", "set", name, raw)
            else:
                config.set(name, parse_value(key, raw))
        config.save()

    def login(self, server: Server, code: str) -> dict[str, Any]:
        self.configure()
        out = self.ok("--json", "login", server.url, "--join-code", code, "--name", self.name)
        return dict(json.loads(out))

    def up_process(self, *extra: str) -> Process:
        return Process(
            ["--home", str(self.home), "--json", "up", *extra],
            self.logs / f"{self.name}-{time.monotonic_ns()}.log",
            env=self.env,
            prefix=self.prefix,
        )

    def up(self) -> AgentHome:
        self.process = self.up_process()
        self.process.read_line(r'"event": "up"')
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.stop(sig)
            self.process = None

    def devices(self) -> list[dict[str, Any]]:
        out = self.ok("devices", "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def online(self) -> set[str]:
        return {d["name"] for d in self.devices() if d["online"]}


@contextlib.contextmanager
def cleanup(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in things:
            thing.stop()


@contextlib.contextmanager
def agent_homes(root: Path) -> Iterator[Callable[..., AgentHome]]:
    """A factory of agent homes under ``root`` (logs in ``root/logs``), each named after its
    device and reconnecting to the server within a second; every agent made is stopped at the
    end (the ``make_agent`` fixtures, per test or per module)."""
    made: list[AgentHome] = []
    (root / "logs").mkdir(exist_ok=True)

    def factory(name: str, **config: str) -> AgentHome:
        agent = AgentHome(
            root / name,
            root / "logs",
            name,
            config={"server.reconnect_max": "1", "device.name": name, **config},
        )
        made.append(agent)
        return agent

    try:
        yield factory
    finally:
        for agent in made:
            agent.stop()


class Tmux:
    """A private tmux server: each session is a real console (a PTY) that tests type into and
    read the screen of, as a person would."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def _tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        size: tuple[int, int] = (100, 30),
    ) -> None:
        """Run ``argv`` in a new session of ``size`` (cols, rows); the pane stays after exit."""
        environment = {**BASE_ENV, **(env or {}), "TERM": "xterm-256color"}
        exports = " ".join(
            f"{k}={shlex.quote(v)}" for k, v in environment.items() if k.isidentifier()
        )
        command = f"env -i {exports} {shlex.join(argv)}; echo '[exited' $? ']'; sleep 3600"
        cols, rows = size
        done = self._tmux(
            "new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows), command
        )
        assert done.returncode == 0, done.stderr

    def type(self, name: str, text: str, *, enter: bool = False) -> None:
        self._tmux("send-keys", "-t", name, "-l", text)
        if enter:
            self._tmux("send-keys", "-t", name, "Enter")

    def keys(self, name: str, *keys: str) -> None:
        """tmux key names: ``C-]``, ``Enter``, ``q``..."""
        self._tmux("send-keys", "-t", name, *keys)

    def screen(self, name: str) -> str:
        return self._tmux("capture-pane", "-p", "-t", name).stdout

    def title(self, name: str) -> str:
        """The pane's title, as the program set it (OSC 0/2)."""
        return self._tmux("display-message", "-p", "-t", name, "#{pane_title}").stdout

    def resize(self, name: str, cols: int, rows: int) -> None:
        self._tmux("resize-window", "-t", name, "-x", str(cols), "-y", str(rows))

    def wait_for(self, name: str, text: str, timeout: float = 15) -> str:
        try:
            return wait_until(
                lambda: s if text in (s := self.screen(name)) else "", timeout, repr(text)
            )
        except AssertionError:
            raise AssertionError(
                f"{text!r} not on {name}'s screen after {timeout}s:\n{self.screen(name)}"
            ) from None

    def kill(self) -> None:
        self._tmux("kill-server")
