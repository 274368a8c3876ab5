"""A writer process for the store's crash and concurrency tests (run as a script, not collected).

    python store_writer.py STORE loop N           put results 0..N-1 again and again (to be killed)
    python store_writer.py STORE compute LOG K..  get_or_compute each key K, logging every compute
"""

import os
import sys
import time

import pandas as pd
import torch

from workbench.result import Result
from workbench.store import Store


def spec(i: int) -> dict:
    return {"model": {"name": "m"}, "task": {"name": "t"}, "method": "test", "params": {"i": i}}


def result(i: int) -> Result:
    frame = pd.DataFrame({"component": "head", "layer": 0, "head": 0, "metric": "m", "value": [float(i)] * 2000})
    return Result(frame, {"big": torch.full((256, 1024), float(i))})


if __name__ == "__main__":
    store, mode = Store(sys.argv[1]), sys.argv[2]
    if mode == "loop":
        n = int(sys.argv[3])
        print("writing", flush=True)
        while True:
            for i in range(n):
                store.put({**spec(i), "round": time.time_ns()}, result(i))
    else:
        log = sys.argv[3]
        for k in map(int, sys.argv[4:]):
            def compute(k=k):
                with open(log, "a") as f:
                    f.write(f"{k} {os.getpid()}\n")
                time.sleep(0.2)
                return result(k)

            store.get_or_compute(spec(k), compute)
