"""The Kubernetes provider against API servers: the test cluster's, and a silent one.

Behaviours covered:
- the watch starts from a list (a pod already Ready is reported READY);
- when the API server has forgotten the watch's resourceVersion (410 Gone: more changes
  than it keeps happened while the watch was away), the provider lists again and goes
  on: a pod made afterwards is still reported, and the pool's watch never fails;
- an API server that takes connections and never answers (stalled, or half-open): every
  request fails within REQUEST_S with kt's error saying so, where kubernetes_asyncio
  alone would wait for ever; a pod's launch says it did not start and why.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from typing import Any

import pytest

from kt.core.errors import LaunchError, PodLostError
from kt.core.provider import PodSpec, PodState
from kt.k8s import provider as provider_module
from kt.k8s.provider import K8sProvider
from kt.testing import apiserver
from tests.distributed.torchrun import free_port
from tests.k8s.silent import silent_api_server

pytestmark = pytest.mark.timeout(60)
TOKEN = "watch-test"


def _ready_pod(name: str, pool: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "kt", "kt.dev/pool": pool},
            "annotations": {"kt.dev/pool-name": pool},
        },
        "spec": {"containers": [{"name": "kt", "image": "i"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def test_a_410_lists_again_and_the_watch_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setattr(apiserver, "HISTORY", 30)  # the server keeps 30 changes
    monkeypatch.setattr(provider_module, "WATCH_S", 1)  # each watch request lasts 1 s

    async def main() -> None:
        port = free_port()
        tls = apiserver.make_tls()
        runner, server = await apiserver.serve("127.0.0.1", port, TOKEN, tls)
        url = f"https://127.0.0.1:{port}"
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps(apiserver.kubeconfig(url, TOKEN, tls.ca_pem)))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        pods, configmaps = apiserver.RESOURCES["pods"], apiserver.RESOURCES["configmaps"]
        provider = K8sProvider()
        try:
            await server.store.create(pods, "default", _ready_pod("a", "p"))
            events = provider.watch_pods("p")
            first = await asyncio.wait_for(anext(events), 10)
            assert (first.pod.name, first.state) == ("a", PodState.READY)
            waiting = asyncio.ensure_future(anext(events))
            for i in range(100):  # changes the pool's watch does not see (not its pods)
                await server.store.create(configmaps, "default", {"metadata": {"name": f"c{i}"}})
            await asyncio.sleep(1.5)  # the watch request ends; its version is now too old
            await server.store.create(pods, "default", _ready_pod("b", "p"))
            later = await asyncio.wait_for(waiting, 15)
            assert (later.pod.name, later.state) == ("b", PodState.READY)
            assert server.expired >= 1, "the server never answered 410"
            await events.aclose()
        finally:
            await provider.close()
            await runner.cleanup()

    asyncio.run(main())


def test_an_api_server_that_never_answers_fails_each_request_within_its_bound(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setattr(provider_module, "REQUEST_S", 1.0)

    async def main(kubeconfig: pathlib.Path, held: list[asyncio.StreamWriter]) -> None:
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        provider = K8sProvider()
        spec = PodSpec("p", "p-0", cpus=1, memory=0, gpus=0, token="t", launch_timeout=60)
        try:
            for call in (
                provider.read_token("p"),
                provider.list_pods("p"),
                provider.delete_pod("p", "p-0"),
                anext(provider.watch_pods("p")),
                provider._until_gone("default", "metadata.name=p-0", "", 30),  # after a delete
                provider.create_pods([spec]),
            ):
                began = time.monotonic()
                with pytest.raises((PodLostError, LaunchError)) as info:
                    await asyncio.wait_for(call, 20)
                assert "the API server did not answer within 1 s" in str(info.value)
                assert time.monotonic() - began < 10
            assert isinstance(info.value, LaunchError)  # the pod: it did not start, and why
            assert len(held) >= 6  # each request reached the server
        finally:
            await provider.close()

    with silent_api_server(tmp_path) as (kubeconfig, held):
        asyncio.run(main(kubeconfig, held))
