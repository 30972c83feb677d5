"""Everything one agent home holds, loaded once per process: paths, config, secrets, identity."""

from __future__ import annotations

import platform
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from meshagent_gui.config import Config, Paths
from meshagent_gui.core.mesh.client import Enrollment, MeshClient
from meshagent_gui.errors import UserError
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

    @property
    def enrollment(self) -> Enrollment | None:
        return Enrollment.load(self.paths.data_dir)

    def require_enrollment(self) -> Enrollment:
        enrollment = self.enrollment
        if enrollment is None:
            raise UserError(
                "this device is not enrolled yet: run `meshagent login URL --join-code CODE`"
                " (or `meshagent up --local` to start a mesh on this computer)",
                code="not_enrolled",
            )
        return enrollment

    def mesh_client(self) -> MeshClient:
        return MeshClient(self.require_enrollment().url, secrets=self.secrets)
