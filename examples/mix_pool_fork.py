"""mix_pool: different worker functions in one stage, in fork mode and pool mode.

Fork mode (``fork_merge=...``) sends every item to EVERY worker. ``fork_merge``
receives the workers' results as a list ordered by worker index (worker i's
result at position i) and its return value is the stage's single output.

The original README's analysis stage uses ``multi_proc=True``; these analysers
are cheap, so this example keeps ``multi_proc=False``: plain ``def`` workers
then run in threads. Switching to processes changes nothing else.
"""

import asyncio
import re
from collections import Counter

from pypline import Pipeline, current_worker, mix_pool
from pypline.util import unwrap

REVIEWS = [
    "Great battery, great screen. Love it!",
    "Terrible support; the charger broke after a week.",
    "Shipping was fast and the price is fair.",
    "The camera is poor and the battery is awful.",
]

POSITIVE = {"great", "love", "fast", "fair", "good"}
NEGATIVE = {"terrible", "broke", "poor", "awful", "bad"}
STOPWORDS = {"the", "and", "is", "was", "it", "a", "after", "of"}
TOPICS = {
    "hardware": {"battery", "screen", "camera", "charger"},
    "service": {"support", "shipping", "price"},
}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# Each analyser returns (confidence, aspect, finding), so findings from
# different analysers can be compared: max() picks the most confident one.
def analyze_sentiment(text: str) -> tuple[float, str, str]:
    words = _words(text)
    score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return min(1.0, 0.4 + 0.2 * abs(score)), "sentiment", label


def extract_keywords(text: str) -> tuple[float, str, list[str]]:
    counts = Counter(w for w in _words(text) if w not in STOPWORDS and len(w) > 3)
    keywords = [w for w, _ in counts.most_common(3)]
    return 0.5, "keywords", keywords


def classify_topic(text: str) -> tuple[float, str, str]:
    words = set(_words(text))
    hits = {topic: len(words & vocab) for topic, vocab in TOPICS.items()}
    topic = max(hits, key=hits.__getitem__)
    return min(1.0, 0.3 * hits[topic]), "topic", topic


@mix_pool(
    buffer=20,
    multi_proc=False,  # the original README uses True; see the module docstring
    fork_merge=lambda results: max(results),  # Merge results from all workers
)
def analysis_stage():
    return [
        lambda x: analyze_sentiment(x),
        lambda x: extract_keywords(x),
        lambda x: classify_topic(x),
    ]


ASPECTS = ("sentiment", "keywords", "topic")


def merge_report(results: list) -> dict:
    """results[i] is worker i's result, so zipping with ASPECTS is safe."""
    return {aspect: finding for aspect, (_, _, finding) in zip(ASPECTS, results)}


@mix_pool(fork_merge=merge_report)
def report_stage():
    return [analyze_sentiment, extract_keywords, classify_topic]


# Pool mode (no fork_merge): each item goes to ONE worker, whichever is free.
served_by: Counter = Counter()


def _lookup(replica: str, text: str) -> str:
    served_by[f"worker {current_worker().index} ({replica})"] += 1
    return f"{len(text):>3} chars"


@mix_pool
def lookup_stage():
    return [lambda text: _lookup("primary", text), lambda text: _lookup("replica", text)]


async def main() -> None:
    print(f"analysis_stage() called directly returns {len(analysis_stage())} workers")

    best = unwrap(await (Pipeline(REVIEWS) >> analysis_stage).run())
    print("most confident finding per review (fork_merge=max):")
    for review, (confidence, aspect, finding) in zip(REVIEWS, best):
        print(f"  {review[:34]:34} -> {aspect}={finding} ({confidence:.1f})")

    reports = unwrap(await (Pipeline(REVIEWS) >> report_stage).run())
    print("full report per review (fork_merge=merge_report):")
    for report in reports:
        print(f"  {report}")
    expected = [merge_report([f(r) for f in (analyze_sentiment, extract_keywords, classify_topic)])
                for r in REVIEWS]
    print(f"fork_merge saw results in worker order: {reports == expected}")

    sizes = unwrap(await (Pipeline(REVIEWS * 5) >> lookup_stage).run())
    print(f"pool mode: {len(sizes)} items, each served once; by worker: {dict(sorted(served_by.items()))}")


if __name__ == "__main__":
    asyncio.run(main())
