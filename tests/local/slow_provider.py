"""Local providers with a slow or failing launch, for the scheduler's tests.

Real local pods (`LocalProvider`), only their creation takes `KT_SLOW_CREATE_S` seconds
longer (default 5), or, for `FailingSecondProvider`, the second pod of each pool fails.
Registered by the tests as backends "slow-local" and "failing-local".
"""

from __future__ import annotations

import asyncio
import os

from kt.core.errors import LaunchError
from kt.core.provider import Pod, PodSpec
from kt.local.provider import LocalProvider


class SlowProvider(LocalProvider):
    name = "slow-local"

    async def create_pods(self, specs: list[PodSpec]) -> list[Pod]:
        await asyncio.sleep(float(os.environ.get("KT_SLOW_CREATE_S", "5")))
        return await super().create_pods(specs)


class FailingSecondProvider(LocalProvider):
    name = "failing-local"

    def __init__(self) -> None:
        super().__init__()
        self.launches: dict[str, int] = {}

    async def create_pods(self, specs: list[PodSpec]) -> list[Pod]:
        (spec,) = specs
        n = self.launches[spec.pool] = self.launches.get(spec.pool, 0) + 1
        if n == 2:
            await asyncio.sleep(0.5)
            raise LaunchError(spec.pool, spec.name, "the image could not be pulled (test)")
        return await super().create_pods(specs)
