"""What fedward costs beyond the training itself: a federated run against the same local training
done by plain PyTorch, in one process and in two processes (the ideal on a 2-core machine), and
against the same FedAvg task in Flower's simulation engine (benchmarks/flower_side.py, in a
virtualenv of its own that this script builds once: Flower pins another Ray than fedward's).

The workload is the imaging demo's CNN on 3,200 images of 64x64 split over H hospitals, R rounds
of FedAvg. Each side trains with the same function (models/training.train) on the same training
split: the plain PyTorch and Flower sides take each hospital's training tensors as fedward's own
`Hospital` prepared them, so every side takes the same optimizer steps (asserted); fedward alone
reads the DICOM files (cached after the first repetition). Per side and repetition:
- whole: wall time from starting the process to its end (imports, Ray, data, all rounds);
- first round: seconds from the start until the first round began (Flower: its first client call);
- steady round: the median round time after the first;
- peak PSS: the largest sum of proportional set sizes over the process and all it started (Ray's
  own processes included), sampled every 0.2 s.
Sides interleave within each repetition; figures are medians over repetitions.

    python benchmarks/overhead.py --hospitals 8 32 --repeats 5

The Flower virtualenv (about 1.6 GB, 60 to 90 s to build) goes to --flower-cache, by default
~/.cache/fedward-bench.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGES = 3200
CONFIG = ROOT / "configs" / "demo_images.yaml"


def settings(data: Path, hospitals: list[str], runs: Path, name: str, rounds: int) -> list[str]:
    listed = ", ".join(f"{{name: {h}, data: {data / h}, work_dir: {runs / 'sites' / h}}}" for h in hospitals)
    return [f"hospitals=[{listed}]", f"run.root={runs}", f"run.name={name}", f"run.rounds={rounds}", "explain.enabled=false",
            "subgroups.sex=null", "subgroups.age=null", f"run.min_hospitals={len(hospitals)}"]


class PeakMemory:
    """The largest PSS summed over a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        self.root, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            total = 0
            try:
                for process in [self.root, *self.root.children(recursive=True)]:
                    try:
                        total += process.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """When it started (Unix time), wall seconds, peak PSS bytes and stdout of a command run to its end."""
    started, started_at = time.monotonic(), time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(process.pid)
    out, err = process.communicate()
    peak = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{err[-3000:]}")
    return started_at, time.monotonic() - started, peak, out


def fedward_side(data: Path, hospitals: list[str], runs: Path, name: str, rounds: int) -> dict:
    command = [sys.executable, "-m", "fedward.pipelines", "simulate", str(CONFIG), "--no-progress"]
    for setting in settings(data, hospitals, runs, name, rounds):
        command += ["--set", setting]
    started_at, whole, peak, _ = timed_process(command, {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")})
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    return {"whole": whole, "first_round": records[0]["started"] - started_at, "steady": statistics.median(r["seconds"] for r in records[1:]),
            "peak_pss": peak, "rounds": len(records)}


def plain_side(tensors: Path, processes: int, rounds: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--plain", str(tensors), "--processes", str(processes), "--rounds", str(rounds)]
    return _timed_side(command, dict(os.environ))


def flower_side(python: Path, tensors: Path, rounds: int) -> dict:
    command = [str(python), str(Path(__file__).with_name("flower_side.py")), str(tensors), "--rounds", str(rounds), "--project", str(ROOT)]
    return _timed_side(command, {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")})


def _timed_side(command: list[str], env: dict[str, str]) -> dict:
    """A side that prints its figures as one JSON line: first_round_at, rounds, steps."""
    started_at, whole, peak, out = timed_process(command, env)
    figures = json.loads(out.splitlines()[-1])
    return {"whole": whole, "first_round": figures["first_round_at"] - started_at, "steady": statistics.median(figures["rounds"][1:]),
            "peak_pss": peak, "steps": figures["steps"]}


FLOWER = "flwr[simulation]==1.41.0"
TORCH = "torch==2.13.0"  # the one torch on these machines' disk; any other is a multi-GB download
# What models/training, models/networks and fedward/config import beyond torch, pinned to the
# versions this interpreter has, so both sides train with the same libraries.
PROJECT_NEEDS = ("numpy", "scipy", "scikit-learn", "pyyaml", "pydicom")


def flower_python(cache: Path) -> Path:
    """The python of a virtualenv under `cache` with Flower's simulation engine, the project's
    torch and what the project's training code imports; built on first use, reused after."""
    from importlib import metadata

    venv = cache / "flower-venv"
    python, marker = venv / "bin" / "python", venv / "complete"
    pins = [TORCH, *(f"{name}=={metadata.version(name)}" for name in PROJECT_NEEDS)]
    wanted = "\n".join([FLOWER, *pins]) + "\n"
    if marker.exists() and marker.read_text() == wanted:  # the marker says what was installed: changed pins rebuild
        return python
    shutil.rmtree(venv, ignore_errors=True)  # half-built by an interrupted run, or stale
    print(f"building Flower's virtualenv in {venv} (once)", flush=True)
    # This interpreter, for the torch wheel's Python version; isolated, so no local venv.py stands in for the stdlib's.
    subprocess.run([sys.executable, "-I", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)  # alone first, so the resolver settles on the local wheel
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")  # flwr's dependencies may not move torch or numpy
    subprocess.run([*pip, "-c", str(constraints), FLOWER, *PROJECT_NEEDS], check=True)
    marker.write_text(wanted)
    return python


# -- the plain PyTorch side, run as its own process ------------------------------------------------


_TENSORS: dict[str, dict] = {}  # each process reads a hospital's tensors once, as a hospital keeps its data


def _train_share(job: tuple) -> tuple[list, int]:
    """Train each of a share of hospitals from the global weights; their new weights and steps."""
    import torch

    from fedward.models import training

    state, shares, config, round_seed = job
    torch.set_num_threads(1)
    results, steps = [], 0
    for path in shares:
        if path not in _TENSORS:
            _TENSORS[path] = torch.load(path)
        saved = _TENSORS[path]
        model = _model(config, tuple(saved["x"].shape[1:]))
        model.load_state_dict(state)
        training.train(model, saved["x"], saved["y"], epochs=config.train.local_epochs, lr=config.train.lr, seed=round_seed, config=config.train)
        steps += training.local_steps(len(saved["y"]), config.train.local_epochs, config.train.batch_size)
        results.append((len(saved["y"]), {k: v.detach().clone() for k, v in model.state_dict().items()}))
    return results, steps


def _model(config, shape):
    from fedward.models.networks import build_model

    return build_model(config.model, shape)


def plain_run(tensors: Path, processes: int, rounds: int) -> None:
    """FedAvg by hand: each round every hospital trains from the global weights, then the mean."""
    import multiprocessing

    import torch

    from fedward.config import load_config

    torch.set_num_threads(1)
    config = load_config(CONFIG)
    paths = sorted(str(p) for p in tensors.glob("*.pt"))
    model = _model(config, tuple(torch.load(paths[0])["x"].shape[1:]))
    state = model.state_dict()
    pool = multiprocessing.get_context("fork").Pool(processes) if processes > 1 else None
    shares = [paths[i::processes] for i in range(processes)]
    first_round_at, times, steps = time.time(), [], 0
    for round in range(1, rounds + 1):
        began = time.monotonic()
        jobs = [(state, share, config, round) for share in shares]
        answers = pool.map(_train_share, jobs) if pool else [_train_share(jobs[0])]
        trained = [r for results, _ in answers for r in results]
        steps += sum(s for _, s in answers)
        total = sum(n for n, _ in trained)
        state = {k: sum(s[k].double() * n for n, s in trained).div(total).to(v.dtype) if v.is_floating_point() else trained[0][1][k]
                 for k, v in state.items()}
        times.append(time.monotonic() - began)
    if pool:
        pool.close()
    print(json.dumps({"first_round_at": first_round_at, "rounds": times, "steps": steps}))


def export_tensors(data: Path, hospitals: list[str], runs: Path, out: Path) -> int:
    """Each hospital's training tensors exactly as fedward's Hospital prepares them; their steps per round."""
    import torch

    from fedward.actors.hospital import Hospital
    from fedward.config import load_config
    from fedward.models import training

    config = load_config(CONFIG, settings(data, hospitals, runs, "tensors", 1))
    out.mkdir(parents=True)
    steps = 0
    for name in hospitals:
        hospital = Hospital(name, config, "tensors")
        hospital.load()
        hospital.prepare(None)
        x, y = hospital.x[hospital.train_idx].clone(), hospital.y[hospital.train_idx].clone()
        torch.save({"x": x, "y": y}, out / f"{name}.pt")
        steps += training.local_steps(len(y), config.train.local_epochs, config.train.batch_size)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flower-cache", type=Path, default=Path.home() / ".cache" / "fedward-bench", help="where Flower's virtualenv is built")
    parser.add_argument("--no-flower", action="store_true", help="leave the Flower side out")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # the plain side's own process
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_run(args.plain, args.processes, args.rounds)
        return

    from fedward.data_adapters.demo import write_demo_data

    flower = None if args.no_flower else flower_python(args.flower_cache)

    print(f"{IMAGES} images of 64x64, the imaging demo's CNN, {args.rounds} rounds, median of {args.repeats} interleaved repetitions; "
          f"{os.cpu_count()} cores")
    print(f"{'hospitals':>9} {'side':<20}{'whole s':>9}{'first round s':>15}{'steady round s':>16}{'peak PSS GB':>13}{'whole/ideal':>13}"
          f"{'steady/ideal':>14}{'first/Flower':>14}{'PSS/Flower':>12}")
    for count in args.hospitals:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            names = [f"hospital_{i:03d}" for i in range(count)]
            write_demo_data(tmp / "data", hospitals=min(count, 26), images_per_hospital=[IMAGES // count] * min(count, 26),
                            rows_per_hospital=[20] * min(count, 26))
            data = hospital_folders(tmp / "data", names)
            steps = export_tensors(data, names, tmp / "runs", tmp / "tensors")
            sides: dict[str, list[dict]] = {"plain, 1 process": [], "ideal, 2 processes": [], "fedward": [], **({"Flower": []} if flower else {})}
            for repeat in range(args.repeats):
                sides["plain, 1 process"].append(plain_side(tmp / "tensors", 1, args.rounds))
                sides["ideal, 2 processes"].append(plain_side(tmp / "tensors", 2, args.rounds))
                sides["fedward"].append(fedward_side(data, names, tmp / "runs", f"run{repeat}", args.rounds))
                if flower:
                    sides["Flower"].append(flower_side(flower, tmp / "tensors", args.rounds))
            for side, results in sides.items():
                assert side == "fedward" or all(r["steps"] == steps * args.rounds for r in results), f"{side} took other steps than {steps * args.rounds}"
            assert all(r["rounds"] == args.rounds for r in sides["fedward"])
            medians = {side: {k: statistics.median(r[k] for r in results) for k in ("whole", "first_round", "steady", "peak_pss")} for side, results in sides.items()}
            ideal, peer = medians["ideal, 2 processes"], medians.get("Flower")
            for side, m in medians.items():
                against_flower = f"{m['first_round'] / peer['first_round']:>14.2f}{m['peak_pss'] / peer['peak_pss']:>12.2f}" if peer else ""
                print(f"{count:>9} {side:<20}{m['whole']:>9.1f}{m['first_round']:>15.1f}{m['steady']:>16.2f}{m['peak_pss'] / 1e9:>13.2f}"
                      f"{m['whole'] / ideal['whole']:>13.2f}{m['steady'] / ideal['steady']:>14.2f}{against_flower}", flush=True)
            for key in ("whole", "first_round", "steady"):
                print(f"{'':>9} raw {key} s: " + "; ".join(f"{side} {[round(r[key], 2) for r in results]}" for side, results in sides.items()))


def hospital_folders(demo: Path, names: list[str]) -> Path:
    """One folder per hospital name; beyond the demo's 26 sites, hospitals reuse a site's files
    (links), each its own hospital with its own work area."""
    sites = sorted(p for p in demo.iterdir() if p.is_dir())
    root = demo.parent / "hospitals"
    root.mkdir()
    for i, name in enumerate(names):
        (root / name).symlink_to(sites[i % len(sites)], target_is_directory=True)
    return root


if __name__ == "__main__":
    main()
