"""A first look at kt on the local backend: actors, functions, fan-out, a streamed result.

Run with `make demo` (until the GRPO example lands) or `python examples/quickstart.py`.
"""

from __future__ import annotations

import asyncio
import time

import kt


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def countdown(self, n: int) -> object:
        for i in range(n, 0, -1):
            print(f"tick {i}")
            yield i


def square(x: int) -> int:
    return x * x


async def fan_out(counters: list[kt.ActorHandle], n: int) -> list[int]:
    return await asyncio.gather(*[counters[i % len(counters)].incr.remote(1) for i in range(n)])


def main() -> None:
    pool = kt.Compute(cpus=4, replicas=1, backend="local")
    start = time.perf_counter()
    Counter_ = kt.cls(Counter)
    counters = [Counter_.options(compute=pool).remote(start=100 * i) for i in range(4)]
    print(
        "first call:", counters[0].incr(5), f"({time.perf_counter() - start:.2f} s incl. pod start)"
    )

    begin = time.perf_counter()
    results = asyncio.run(fan_out(counters, 10_000))
    elapsed = time.perf_counter() - begin
    print(f"10,000 calls over 4 actors: {10_000 / elapsed:,.0f} calls/s, last = {results[-1]}")

    print("streamed:", list(counters[1].countdown.remote(3)))

    remote_square = kt.fn(square).to(pool)
    print("kt.fn:", remote_square(7), kt.get([remote_square.remote(i) for i in range(5)]))
    kt.shutdown()


if __name__ == "__main__":
    main()
