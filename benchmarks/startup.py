"""Where a simulation's start-up goes: seconds from process start to each stage before round 1.

Runs the imaging demo with --hospitals hospitals of 400 images twice in fresh processes (the second
reads the DICOM cache the first wrote) and prints, per run, when each stage of Pipeline.run ended.

    python benchmarks/startup.py --hospitals 8
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("_check_deployment", "_validate", "_harmonize", "_check_builds")


def timed_run(config: Path, settings: list[str]) -> None:
    """In this process: the pipeline with each stage's end marked, as the child of `main`."""
    marks = [("python started", 0.0)]

    def mark(what: str) -> None:
        marks.append((what, time.time() - STARTED))

    import importlib

    importlib.import_module("torch")  # first, timed alone: the largest import

    mark("torch imported")
    sys.path.insert(0, str(ROOT))
    from fedward.config import load_config
    from fedward.pipelines import run

    mark("pipeline imported")

    def ending(name, function):
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            mark(name)
            return result

        return call

    run.start_ray = ending("Ray started", run.start_ray)
    run.start_pool = ending("workers asked for", run.start_pool)
    for stage in STAGES:
        setattr(run.Pipeline, stage, ending(stage.strip("_").replace("_", " ") + " done", getattr(run.Pipeline, stage)))
    pipeline = run.Pipeline(load_config(config, settings), progress=False, log=lambda _: None)
    pipeline.run()
    first = json.loads((pipeline.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    marks.append(("round 1 started", first["started"] - STARTED))
    print(json.dumps(marks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=int, default=8)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = ROOT / "configs" / "demo_images.yaml"
    if args.child is not None:
        timed_run(config, args.child)
        return
    sys.path.insert(0, str(ROOT))
    from fedward.data_adapters.demo import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_demo_data(data, hospitals=args.hospitals, images_per_hospital=[400] * args.hospitals, rows_per_hospital=[20] * args.hospitals)
        listed = ", ".join(f"{{name: {h.name}, data: {h}, work_dir: {Path(tmp) / 'sites' / h.name}}}" for h in sorted(data.glob("hospital_*")))
        runs = {}
        for name in ("first pass", "cached"):
            settings = [f"hospitals=[{listed}]", f"run.root={tmp}/runs", f"run.name={name.replace(' ', '_')}", "run.rounds=1",
                        "explain.enabled=false", "subgroups.sex=null", "subgroups.age=null"]
            out = subprocess.run([sys.executable, __file__, "--child", *settings], check=True, capture_output=True, text=True,
                                 env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}).stdout
            runs[name] = json.loads(out.splitlines()[-1])
    print(f"{args.hospitals} hospitals of 400 images, the imaging demo, seconds since the process started")
    print(f"{'stage':<22}" + "".join(f"{name:>12}" for name in runs))
    for i, (stage, _) in enumerate(runs["first pass"]):
        print(f"{stage:<22}" + "".join(f"{marks[i][1]:>12.2f}" for marks in runs.values()))


if __name__ == "__main__":
    main()
