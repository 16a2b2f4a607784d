"""How fast the driver turns updates into the next global model, against a plain memory copy.

Prints, for each model size and number of hospitals, GB/s of float32 updates taken in (hospitals x
parameters x 4 bytes per second) by
- `mean`: the weighted mean alone (fedward/aggregation.weighted_mean);
- `round`: what the driver does to a plaintext FedAvg round's updates: the admission checks
  (pipelines/admission.py: layout, counts, finite values) and the strategy's aggregate;
and, as the yardstick, `memcpy`: numpy copying one large float32 buffer into another (bytes copied
per second; the machine's single-core copy bandwidth). Medians of `--repeats` timings, all in one
run, interleaved.

    python benchmarks/aggregation.py
    python benchmarks/aggregation.py --params 1000000 10000000 --hospitals 8 32 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedward.types import Layout, Update  # noqa: E402
from fedward.pipelines import admission  # noqa: E402
from fedward.aggregation import weighted_mean  # noqa: E402
from fedward.strategies.fedavg import FedAvg  # noqa: E402
from tests.conftest import ehr_config  # noqa: E402
from fedward.config import parse_config  # noqa: E402

COPY_BYTES = 400 * 2**20  # far beyond the CPU's caches


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", nargs="+", type=int, default=[1_000_000, 10_000_000])
    parser.add_argument("--hospitals", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    source = np.ones(COPY_BYTES // 4, np.float32)
    target = np.empty_like(source)
    strategy = FedAvg(parse_config(ehr_config(Path("/nonexistent"), Path("/nonexistent"))))
    print(f"{'params':>11}{'hospitals':>10}{'memcpy GB/s':>13}{'mean GB/s':>11}{'round GB/s':>12}{'mean/memcpy':>13}{'round/memcpy':>14}")
    for size in args.params:
        layout = Layout(("w",), ((size,),))
        current = np.zeros(size, np.float32)
        for count in args.hospitals:
            rng = np.random.default_rng(0)
            updates = [
                Update(hospital=f"h{i:03d}", round=1, delta=rng.standard_normal(size, np.float32) * 1e-3, layout=layout,
                       num_examples=100 + i, weight=100 + i, metrics={"loss": 0.5})
                for i in range(count)
            ]
            answers = {u.hospital: u for u in updates}
            layouts = {u.hospital: layout for u in updates}
            examples = {u.hospital: u.num_examples for u in updates}

            def whole_round():
                admitted, refused = admission.admit(1, answers, layouts, "plain", examples)
                assert not refused, refused
                strategy.aggregate(1, current, list(admitted.values()), {})

            strategy.layout = layout
            timings = {"memcpy": [], "mean": [], "round": []}
            for _ in range(args.repeats):  # interleaved, so a busy moment on the machine hits all alike
                timings["memcpy"].append(timed(lambda: np.copyto(target, source)))
                timings["mean"].append(timed(lambda: weighted_mean(updates)))
                timings["round"].append(timed(whole_round))
            volume = count * size * 4
            memcpy = source.nbytes / statistics.median(timings["memcpy"]) / 1e9
            mean = volume / statistics.median(timings["mean"]) / 1e9
            whole = volume / statistics.median(timings["round"]) / 1e9
            print(f"{size:>11,}{count:>10}{memcpy:>13.2f}{mean:>11.2f}{whole:>12.2f}{mean / memcpy:>13.2f}{whole / memcpy:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
