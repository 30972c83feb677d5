"""Enrolment: register this device's certificate with a Mesh Server and keep what it answers."""

from __future__ import annotations

from meshagent_gui.context import Context

from .client import Enrollment, MeshClient, MeshError, normalize_url
from .types import EnrollRequest


async def enroll(
    ctx: Context,
    url: str,
    *,
    join_code: str | None = None,
    username: str | None = None,
    password: str | None = None,
    device_name: str | None = None,
) -> Enrollment:
    url = normalize_url(url)
    if (join_code is None) == (username is None):
        raise MeshError("give either a join code or a user name and password", code="usage")
    if device_name:
        ctx.config.set("device.name", device_name)
    identity = ctx.identity
    request = EnrollRequest(
        join_code=join_code.strip() if join_code else None,
        username=username,
        password=password,
        device_name=ctx.device_name,
        platform=ctx.platform,
        certificate=identity.certificate_pem.decode("ascii"),
    )
    async with MeshClient(url, secrets=ctx.secrets) as client:
        answer = await client.enroll(request)
        if answer.device_id != identity.device_id:
            raise MeshError(
                "the server registered a different certificate fingerprint than this device's;"
                " refusing to trust it",
                code="fingerprint_mismatch",
            )
        client.store_tokens(answer)
    enrollment = Enrollment(
        url=url,
        server_id=answer.server_id,
        device_id=answer.device_id,
        user=answer.user,
        keys=list(answer.keys),
    )
    enrollment.save(ctx.paths.data_dir)
    ctx.config.set("server.url", url)
    ctx.config.save()
    return enrollment
