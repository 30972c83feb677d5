"""Enrolment: register this device's certificate with a Mesh Server and keep what it answers.

The device proves it holds the certificate's key by signing a nonce of the server's
(:meth:`MeshClient.enroll`); the answer must name this very certificate. What it keeps is read
back here too (:func:`load_enrollment`, :func:`require_enrollment`, :func:`mesh_client`): the
context below the core knows the home, not the server.
"""

from __future__ import annotations

from meshagent_gui.context import Context
from meshagent_gui.errors import UserError

from .client import EnrollCredentials, Enrollment, MeshClient, MeshError, normalize_url


def load_enrollment(ctx: Context) -> Enrollment | None:
    """This home's enrolment, or None before the first ``meshagent login``."""
    return Enrollment.load(ctx.paths.data_dir)


def require_enrollment(ctx: Context) -> Enrollment:
    """This home's enrolment; a :class:`UserError` saying how to enrol if there is none."""
    enrollment = load_enrollment(ctx)
    if enrollment is None:
        raise UserError(
            "this device is not enrolled yet: run `meshagent join CODE` with a code from your"
            " mesh (or `meshagent up --local` to start a mesh on this computer)",
            code="not_enrolled",
        )
    return enrollment


def mesh_client(ctx: Context) -> MeshClient:
    """A REST client for the server this home is enrolled with."""
    return MeshClient(require_enrollment(ctx).url, secrets=ctx.secrets)


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
    credentials = EnrollCredentials(
        device_name=ctx.device_name,
        platform=ctx.platform,
        join_code=join_code.strip() if join_code else None,
        username=username,
        password=password,
    )
    async with MeshClient(url, secrets=ctx.secrets) as client:
        # The identity signs the server's nonce: the certificate alone is public.
        answer = await client.enroll(identity, credentials)
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
