"""Everything one agent home holds, loaded once per process: paths, config, secrets, identity.

A foundation module: the core builds on it, so it imports nothing of the core. What the home
holds about a server (the enrolment, a client for it) is read by ``core/mesh/enroll.py``
(``load_enrollment(ctx)``, ``require_enrollment(ctx)``, ``mesh_client(ctx)``).
"""

from __future__ import annotations

import platform
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from meshagent_gui.config import Config, Paths
from meshagent_gui.identity import Identity, load_or_create
from meshagent_gui.secrets import SecretStore


@dataclass
class Context:
    paths: Paths
    config: Config

    @classmethod
    def open(cls, home: str | Path | None = None) -> Context:
        paths = Paths.resolve(home)
        paths.ensure()
        return cls(paths, Config.load(paths.config_file))

    @cached_property
    def secrets(self) -> SecretStore:
        return SecretStore.open(
            self.paths.data_dir, self.paths.home, str(self.config["secrets.backend"])
        )

    @property
    def device_name(self) -> str:
        return str(self.config["device.name"] or socket.gethostname() or "device")

    @cached_property
    def identity(self) -> Identity:
        return load_or_create(self.paths.certificate_file, self.secrets, self.device_name)

    @property
    def platform(self) -> str:
        return platform.system().lower() or "unknown"
