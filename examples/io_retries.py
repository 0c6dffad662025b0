"""I/O-bound work with retries, ``retry_on``, ``backoff`` and ``timeout``.

The original README fetches URLs with httpx. This example must never touch the
network, so ``FakeAsyncClient`` stands in for ``httpx.AsyncClient``: it sleeps
briefly like a real request would and fails in a deterministic pattern.

* ``mock://shop/items/N`` answers 503 (a transient error) for its first
  ``N % 4`` requests, then 200. Retries recover these.
* item 13 does not exist: always 404. Retrying cannot help.
* item 7's first request hangs (a stuck connection): only a timeout helps.

``retries=N`` is the TOTAL number of attempts, not the number of re-tries.
"""

import asyncio
from collections import Counter

from pypline import Pipeline, current_worker, work_pool
from pypline.util import is_err, unwrap_err

URLS = [f"mock://shop/items/{n}" for n in range(20)]


class HTTPStatusError(Exception):
    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"{status} for {url}")
        self.status = status


class ServerError(HTTPStatusError):
    """5xx: the server's fault, worth retrying."""


class ClientError(HTTPStatusError):
    """4xx: our request is wrong, retrying will not help."""


class FakeResponse:
    def __init__(self, status: int, url: str, payload: dict | None = None) -> None:
        self.status_code, self.url, self._payload = status, url, payload

    def raise_for_status(self) -> None:
        if self.status_code >= 500:
            raise ServerError(self.status_code, self.url)
        if self.status_code >= 400:
            raise ClientError(self.status_code, self.url)

    def json(self) -> dict:
        assert self._payload is not None
        return self._payload


class FakeAsyncClient:
    """An in-memory stand-in for ``httpx.AsyncClient`` (no sockets at all)."""

    requests: Counter = Counter()  # url -> number of requests so far
    hang_first_request_of: set = set()

    async def __aenter__(self) -> "FakeAsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def get(self, url: str) -> FakeResponse:
        FakeAsyncClient.requests[url] += 1
        seen = FakeAsyncClient.requests[url]
        item_id = int(url.rsplit("/", 1)[1])
        if item_id in self.hang_first_request_of and seen == 1:
            await asyncio.sleep(30)  # a stuck connection; cancelled by the stage timeout
        await asyncio.sleep(0.01)  # network latency
        if item_id == 13:
            return FakeResponse(404, url)
        if seen <= item_id % 4:
            return FakeResponse(503, url)
        return FakeResponse(200, url, {"id": item_id, "name": f"item-{item_id}", "price": 5 + item_id})


attempts_needed: dict[str, int] = {}


# --- 1. The original README's stage: every exception is retried (the default retry_on).
@work_pool(retries=5, num_workers=10, buffer=100)
async def fetch_data(url):
    attempts_needed[url] = current_worker().attempt  # counts from 1
    async with FakeAsyncClient() as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.json()


# --- 2. Stricter: retry only transient errors, bound each attempt, back off.
@work_pool(retries=5, num_workers=10, buffer=100,
           retry_on=(ServerError, TimeoutError), timeout=0.5, backoff=0.01)
async def fetch_strict(url):
    async with FakeAsyncClient() as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.json()


def report(title: str, result) -> None:
    print(title)
    if is_err(result):
        error = unwrap_err(result)  # PipelineError: failures + every successful output
        print(f"  fetched {len(error.outputs)} of {len(URLS)}; {len(error.failures)} failed")
        for failure in error.failures:
            print(f"  failed: index={failure.index} attempts={failure.attempts} "
                  f"error={type(failure.error).__name__}: {failure.error}")
    else:
        print(f"  fetched all {len(URLS)}")
    print(f"  requests sent: {sum(FakeAsyncClient.requests.values())}")


async def main() -> None:
    result = await (Pipeline(URLS) >> fetch_data).run()
    report("default retry_on=(Exception,), retries=5:", result)
    by_attempts = Counter(attempts_needed.values())
    print(f"  URLs by attempts used: {dict(sorted(by_attempts.items()))}")

    FakeAsyncClient.requests.clear()
    FakeAsyncClient.hang_first_request_of = {7}
    result = await (Pipeline(URLS) >> fetch_strict).run()
    report("retry_on=(ServerError, TimeoutError), timeout=0.5, backoff=0.01:", result)
    print(f"  item 7 recovered after a timeout: {FakeAsyncClient.requests['mock://shop/items/7']} requests")


if __name__ == "__main__":
    asyncio.run(main())
