"""Per-worker state: a model loaded once per worker process, a database connection per worker.

``setup`` runs once in each worker before its first item and returns that worker's state
(``current_worker().state``); ``teardown`` gets the state back when the worker stops. Here
each of 2 worker processes "loads a model" (slow: 0.2 s) and opens its own sqlite file;
every call scores an item with the model and stores it; teardown commits and closes.
The model is loaded twice in all (once per worker), not 200 times (once per item).
"""

import os
import sqlite3
import tempfile
import time

from pypline import Pipeline, current_worker, work_pool

FOLDER = tempfile.mkdtemp()


def load_model_and_connect():
    time.sleep(0.2)  # loading a model is slow: do it once per worker
    with open(os.path.join(FOLDER, "loads.txt"), "a") as log:
        log.write(f"{os.getpid()}\n")
    model = {"weight": 3, "pid": os.getpid()}
    db = sqlite3.connect(os.path.join(FOLDER, f"scores-{current_worker().index}.db"))
    db.execute("create table scores (item integer, score integer)")
    return {"model": model, "db": db}


def commit_and_close(state):
    state["db"].commit()
    state["db"].close()


@work_pool(num_workers=2, multi_proc=True, setup=load_model_and_connect, teardown=commit_and_close)
def score(item):
    state = current_worker().state
    value = item * state["model"]["weight"]
    state["db"].execute("insert into scores values (?, ?)", (item, value))
    return state["model"]["pid"]


if __name__ == "__main__":
    t0 = time.perf_counter()
    pids = (Pipeline(range(200)) >> score).run_sync().unwrap()
    took = time.perf_counter() - t0
    rows = 0
    for name in sorted(os.listdir(FOLDER)):
        if name.endswith(".db"):
            with sqlite3.connect(os.path.join(FOLDER, name)) as db:
                rows += db.execute("select count(*) from scores").fetchone()[0]
    with open(os.path.join(FOLDER, "loads.txt")) as log:
        loads = log.read().split()
    print(f"200 items scored in {took:.2f} s by {len(set(pids))} worker processes")
    print(f"model loads: {len(loads)} (one per worker process: {sorted(set(loads)) == sorted(loads)})")
    print(f"rows committed by teardown: {rows}")
