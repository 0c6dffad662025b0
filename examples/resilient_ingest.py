"""An ingestion job that a flaky API and a crash cannot spoil: batches, a rate limit, retries
decided by the error, a circuit breaker, a dead-letter file and a journal to resume from.

The "API" is simulated in this process: it is down for its first 0.3 s (every call raises
``Unavailable``, worth retrying), rejects records with a negative value (``Rejected``, not
worth retrying), and costs much less per record when called with a batch. The script
runs the job twice with the same journal: the first run is interrupted after 120 records,
as a crash would; the second does only what is left.
"""

import json
import os
import tempfile
import time

from pypline import Pipeline, work_pool


class Unavailable(Exception):
    """The service is down for a moment (HTTP 503)."""


class Rejected(Exception):
    """The service refuses this record (HTTP 422): retrying will not help."""


UP_AT = time.monotonic() + 0.3


@work_pool(
    batch=25,  # one call per 25 records
    num_workers=2,
    rate=(20, 1.0),  # at most 20 calls per second, whatever the retries
    retries=6,
    backoff=0.05,
    max_backoff=0.2,
    retry_on=lambda e: isinstance(e, Unavailable),  # retry 503s, never 422s
    pause_after=3,  # three 503s in a row: stop calling, probe with one batch
)
def send(records):
    if time.monotonic() < UP_AT:
        raise Unavailable("503 service unavailable")
    bad = [r for r in records if r["value"] < 0]
    if bad:
        raise Rejected(f"422: negative value in record {bad[0]['id']}")
    time.sleep(0.005 + 0.0001 * len(records))  # a fixed cost per call, a small one per record
    return [r["id"] for r in records]


def records():
    for i in range(300):
        yield {"id": i, "value": -1 if i in (42, 217) else i}


def main() -> None:
    folder = tempfile.mkdtemp()
    journal = os.path.join(folder, "ingest.journal")
    dead = os.path.join(folder, "dead.jsonl")

    first = Pipeline(records()) >> send
    sent = 0
    for r in first.iter(journal=journal, key=lambda rec: rec["id"], ordered=True):
        sent += r.is_ok()
        if sent == 120:
            break  # as if the process had been killed here
    stats = first.last_stats.stages[0]
    print(f"first run: {sent} records sent, then interrupted")
    print(f"  the outage: calls retried by error type {dict(stats.retries_by_error)}, "
          f"breaker tripped {stats.details['breaker_trips']} time(s)")

    pipeline = Pipeline(records()) >> send
    result = pipeline.run_sync(journal=journal, key=lambda rec: rec["id"], collect=False, on_failure=dead)
    error = result.unwrap_err()  # two records were rejected
    print(f"second run: {error.delivered} more sent, {error.failed} rejected")
    rejected = [json.loads(line) for line in open(dead)]
    print("dead letters:", [(d["item"]["id"], d["error_type"], d["attempts"]) for d in rejected])
    total = sent + error.delivered + error.failed
    print(f"every record handled exactly once: {total == 300}")


if __name__ == "__main__":
    main()
