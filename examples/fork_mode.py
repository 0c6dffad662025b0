"""Pool mode vs fork mode in a ``work_pool``, and ``current_worker()``.

Pool mode (the default) load-balances: each item is handled by exactly one of
the stage's identical workers. Fork mode (``fork_merge=f``) broadcasts: every
worker handles every item, and ``f`` merges their results, which arrive as a
list ordered by worker index. ``current_worker()`` tells identical workers
apart, so each can take its own aspect of the item.
"""

import asyncio
from collections import Counter

from pypline import Pipeline, current_worker, work_pool
from pypline.util import unwrap

ORDERS = [
    {"id": 1, "price": 20.0, "rating": 4.5, "days": 2},
    {"id": 2, "price": 95.0, "rating": 3.0, "days": 7},
    {"id": 3, "price": 45.0, "rating": 5.0, "days": 1},
    {"id": 4, "price": 10.0, "rating": 2.0, "days": 14},
]

# ---------------------------------------------------------------- pool mode
handled_by: Counter = Counter()


def heavy_computation(order: dict) -> float:
    return round(order["price"] * 1.2, 2)  # price including tax


@work_pool(num_workers=4)  # Items distributed across 4 workers
async def process(item):
    handled_by[current_worker().index] += 1
    await asyncio.sleep(0.01)  # while one worker waits, the others take items
    return heavy_computation(item)


# ---------------------------------------------------------------- fork mode
# Worker 0 scores the price, worker 1 the rating, worker 2 the delivery time.
SCORERS = [
    lambda order: max(0.0, 10.0 - order["price"] / 10),
    lambda order: order["rating"] * 2.0,
    lambda order: max(0.0, 10.0 - order["days"]),
]


def analyze_aspect(order: dict) -> float:
    return round(SCORERS[current_worker().index](order), 1)


@work_pool(num_workers=3, fork_merge=lambda results: sum(results))
async def aggregate(item):
    return analyze_aspect(item)  # Each worker analyzes different aspect


@work_pool(num_workers=3, fork_merge=tuple)  # keep the per-worker results
async def breakdown(item):
    return analyze_aspect(item)


@work_pool(name="inspect")
async def show_worker(item):
    return current_worker()


async def main() -> None:
    prices = unwrap(await (Pipeline(ORDERS * 5) >> process).run())
    print(f"pool mode: {len(prices)} outputs, one per item; first: {prices[:4]}")
    print(f"  items per worker index: {dict(sorted(handled_by.items()))} (sum {sum(handled_by.values())})")

    totals = unwrap(await (Pipeline(ORDERS) >> aggregate).run())
    parts = unwrap(await (Pipeline(ORDERS) >> breakdown).run())
    print("fork mode: every worker scores every order")
    for order, total, (price, rating, delivery) in zip(ORDERS, totals, parts):
        print(f"  order {order['id']}: price={price} rating={rating} delivery={delivery} -> total={total}")
    print(f"fork totals equal the sum of the per-worker parts: "
          f"{all(abs(t - sum(p)) < 1e-9 for t, p in zip(totals, parts))}")

    info = unwrap(await (Pipeline(["x"]) >> show_worker).run())[0]
    print(f"current_worker() inside a stage: {info}")


if __name__ == "__main__":
    asyncio.run(main())
