"""The original README's "Multi-Stage Data Pipeline": ingest -> analyse -> store.

``ingest`` loads documents concurrently, ``analyze`` is a fork-mode mix_pool
whose two workers each add one field (their results arrive ordered by worker
index, so ``results[0]`` is the sentiment and ``results[1]`` the keywords),
and ``store`` writes each enriched record to a database.

The loaders and the database are in-memory fakes: no files, no network.
"""

import asyncio
import json
import re
from collections import Counter

from pypline import Pipeline, mix_pool, work_pool
from pypline.util import is_ok, unwrap, unwrap_err

# ------------------------------------------------------------ stand-ins
FAKE_FILES = {
    "file1.json": json.dumps({"title": "Release notes", "body": "Great release, faster startup and good docs."}),
    "file2.json": json.dumps({"title": "Bug report", "body": "The parser crashes on empty input. Bad regression."}),
}
FAKE_API = {"api_endpoint": {"title": "Survey", "body": "Users like the new pipeline API and the retries."}}

POSITIVE = {"great", "good", "faster", "like", "love"}
NEGATIVE = {"bad", "crashes", "regression", "slow"}
STOPWORDS = {"the", "and", "on", "new"}


async def load_data(source: str) -> dict:
    """Read a JSON file or call an API (simulated with a short sleep)."""
    await asyncio.sleep(0.02)
    if source.endswith(".json"):
        return json.loads(FAKE_FILES[source])
    return dict(FAKE_API[source])


def analyze_sentiment(item: dict) -> str:
    words = re.findall(r"[a-z]+", item["body"].lower())
    score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


def extract_keywords(item: dict) -> list[str]:
    words = re.findall(r"[a-z]+", item["body"].lower())
    counts = Counter(w for w in words if len(w) > 3 and w not in STOPWORDS)
    return [w for w, _ in counts.most_common(3)]


class FakeDatabase:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    async def store(self, record: dict) -> None:
        await asyncio.sleep(0.01)
        self.rows.append(record)


database = FakeDatabase()


# ------------------------------------------------------------ the pipeline
# Data ingestion stage
@work_pool(buffer=50, num_workers=2)
async def ingest(source):
    return await load_data(source)


# Parallel analysis stage
@mix_pool(fork_merge=lambda results: {**results[0], **results[1]})
def analyze():
    return [
        lambda item: {"sentiment": analyze_sentiment(item)},
        lambda item: {"keywords": extract_keywords(item)},
    ]


# Output stage
@work_pool(buffer=10, retries=2)
async def store(enriched_item):
    await database.store(enriched_item)
    return enriched_item


# Compose and run pipeline
async def main():
    data_sources = ["file1.json", "file2.json", "api_endpoint"]

    pipeline = (Pipeline(data_sources)
        .stage(ingest)
        .stage(analyze)
        .stage(store))

    result = await pipeline.run()
    return result


if __name__ == "__main__":
    result = asyncio.run(main())
    if not is_ok(result):
        print(f"pipeline failed: {unwrap_err(result)}")
        raise SystemExit(1)
    sources = ["file1.json", "file2.json", "api_endpoint"]
    for source, record in zip(sources, unwrap(result)):  # outputs follow source order
        print(f"{source:>12} -> {record}")
    print(f"stored {len(database.rows)} records in the database")
