"""The test API server on its own (no kubelet, no scheduler), over TLS, for tests that
drive it with kubernetes_asyncio as its administrator and as the tokens it issues."""

from __future__ import annotations

import pathlib

from aiohttp import web
from kubernetes_asyncio import client

from kt.testing import apiserver
from tests.distributed.torchrun import free_port


def configuration(url: str, token: str, ca: pathlib.Path) -> client.Configuration:
    """For `url`, sending `token`, trusting the CA at `ca`."""
    conf = client.Configuration(host=url, api_key={"BearerToken": f"Bearer {token}"})
    conf.ssl_ca_cert = str(ca)
    return conf


def api_client(url: str, token: str, ca: pathlib.Path) -> client.ApiClient:
    return client.ApiClient(configuration(url, token, ca))


async def start(
    tmp: pathlib.Path, admin: str
) -> tuple[client.ApiClient, str, pathlib.Path, web.AppRunner]:
    """Serve on a free port with `admin` as the administrator's token: the admin's
    client, the URL, the CA file (in `tmp`) and the runner (`cleanup()` stops it)."""
    port = free_port()
    tls = apiserver.make_tls()
    runner, _ = await apiserver.serve("127.0.0.1", port, admin, tls)
    url = f"https://127.0.0.1:{port}"
    ca = tmp / "ca.pem"
    ca.write_bytes(tls.ca_pem)
    return api_client(url, admin, ca), url, ca, runner
