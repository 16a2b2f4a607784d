"""What each privacy hook costs: round time against plaintext, bytes each hospital sends.

Three measurements, each printing its raw figures:

- `--params N --hospitals H` (default 1,000,000 and 8): the hooks' protocol alone, every party in
  this one process (no training, no Ray), on random updates of N parameters. Hospital time is the
  slowest hospital's own work (key set-up answers, encoding, unmasking or decryption answers), as
  hospitals work in parallel; driver time is its set-up, combination and finish; their sum is
  what the hook adds to a round's training time.
- `--masking-cost`: the masking protocol's added time before the checks against a lying driver
  (privacy/masking.py as of commit MASKING_BEFORE, read from this repository's history), and now,
  in one trust domain (unsigned) and in cross-site mode (signed advertisements and survivor sets,
  roster, record of unmaskings), at each `--params` with `--hospitals`, interleaved, `--repeats`
  times each, medians; the added time of plaintext (encoding and summing as they are) is
  subtracted, and the ratio of the new overheads to the old is printed.
- `--pipeline CONFIG`: a federation run through the real pipeline on an embedded Ray once per
  hook, in the same invocation: median round seconds and bytes per hospital per round from each
  run's metrics and privacy ledger. `--data DIR` takes the hospitals of a demo-data folder.

    python benchmarks/privacy_hooks.py --params 1000000 --hospitals 8
    python benchmarks/privacy_hooks.py --masking-cost --params 1000000 --params 10000000 --hospitals 8 --repeats 3
    python benchmarks/privacy_hooks.py --pipeline configs/demo_images.yaml --rounds 5
    fedward demo-data --out /tmp/demo8 --hospitals 8
    python benchmarks/privacy_hooks.py --pipeline configs/demo_ehr.yaml --data /tmp/demo8 --set 'model.hidden=[1024,960]'
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedward.config import load_config  # noqa: E402
from fedward.checkpoint import load_checkpoint  # noqa: E402
from fedward.pipelines.rounds import wire_bytes  # noqa: E402
from fedward.pipelines.run import Pipeline  # noqa: E402
from fedward.privacy.hooks import Trust  # noqa: E402
from tests.consortium import consortium  # noqa: E402
from tests.privacy.federation import Federation, config_with, random_updates, weighted_mean  # noqa: E402

MASKING_BEFORE = "922d782"  # the last commit before the checks against a lying driver

HOOKS = {
    "plaintext": {},
    "masking": {"masking": {"enabled": True}},
    "encryption": {"encryption": {"enabled": True}},
}


class TimedFederation(Federation):
    """The in-process federation, timing each party's work and counting what hospitals send."""

    def __init__(self, config, trust=None):
        super().__init__(config, trust=trust)
        self.hospital_seconds = {h: 0.0 for h in self.hospitals}
        self.sent = {h: 0 for h in self.hospitals}
        for name, hook in self.hospitals.items():
            hook.respond = self._timed(name, hook.respond, answer=True)
            hook.encode = self._timed(name, hook.encode, answer=True)

    def _timed(self, name, method, answer):
        def call(*args):
            began = time.perf_counter()
            result = method(*args)
            self.hospital_seconds[name] += time.perf_counter() - began
            self.sent[name] += wire_bytes(result)
            return result

        return call


def protocol_costs(params: int, hospitals: int) -> None:
    print(f"hook protocol alone: {params:,} parameters, {hospitals} hospitals, one process")
    print(f"{'hook':<11} {'hospital s':>10} {'driver s':>9} {'added s':>8} {'MiB/hospital':>13} {'max error':>10}")
    for name, privacy in HOOKS.items():
        dropout = {"dropout_tolerance": max(1, hospitals // 2 - 1)} if name == "masking" else {}
        config = config_with({k: {**v, **dropout} for k, v in privacy.items()}, hospitals)
        federation = TimedFederation(config)
        updates = random_updates(config, 1, params, seed=1, scale=0.01)
        began = time.perf_counter()
        federation.start()
        result = federation.round(1, updates)
        total = time.perf_counter() - began
        hospital = max(federation.hospital_seconds.values())
        driver = total - sum(federation.hospital_seconds.values())
        error = float(abs(result[0].delta - weighted_mean(list(updates.values()))).max()) if name != "plaintext" else 0.0
        mib = statistics.mean(federation.sent.values()) / 2**20
        print(f"{name:<11} {hospital:>10.3f} {driver:>9.3f} {hospital + driver:>8.3f} {mib:>13.2f} {error:>10.2e}")


def masking_before():
    """privacy/masking.py as it was at MASKING_BEFORE, imported from this repository's history."""
    name = "fedward.privacy.masking_before"
    if name not in sys.modules:
        try:
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{MASKING_BEFORE}:privacy/masking.py"], capture_output=True, text=True,
                                    check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"--masking-cost reads the old masking from git history ({MASKING_BEFORE}); this checkout cannot: {e}")
        module = sys.modules[name] = types.ModuleType(name)
        exec(compile(source, f"privacy/masking.py@{MASKING_BEFORE}", "exec"), module.__dict__)
    return sys.modules[name]


def added_seconds(federation: TimedFederation, updates) -> float:
    """One round's protocol time: the slowest hospital's own work plus the driver's."""
    began = time.perf_counter()
    federation.start()
    result = federation.round(1, updates)
    total = time.perf_counter() - began
    error = float(abs(result[0].delta.astype(float) - weighted_mean(list(updates.values()))).max()) if len(result) == 1 else 0.0
    assert error < 1e-5, f"the masked sum is off by {error}"
    return max(federation.hospital_seconds.values()) + total - sum(federation.hospital_seconds.values())


def masking_costs(sizes: list[int], hospitals: int, repeats: int) -> None:
    old = masking_before()
    print(f"masking's added seconds per round, {hospitals} hospitals, one process, medians of {repeats} interleaved runs")
    print(f"{'parameters':>11} {'plaintext':>10} {'before':>8} {'one domain':>11} {'cross-site':>11} {'one domain/before':>18} {'cross-site/before':>18}")
    with tempfile.TemporaryDirectory() as folder:
        _, identities = consortium(Path(folder), [f"h{i}" for i in range(hospitals)])
        masked = {"masking": {"enabled": True, "dropout_tolerance": max(1, hospitals // 2 - 1)}}
        plain_config, mask_config = config_with({}, hospitals), config_with(masked, hospitals)
        roster = frozenset(identities)

        def federations(run: int) -> dict[str, TimedFederation]:
            records = {h: Path(folder) / f"{h}-{run}.jsonl" for h in identities}
            before = TimedFederation(mask_config)
            before.driver = old.MaskingHook(mask_config, None, "test-run")
            before.hospitals = {h: old.MaskingHook(mask_config, h, "test-run") for h in identities}
            for h, hook in before.hospitals.items():  # the old encode took no digest of the starting weights
                hook.encode = before._timed(h, lambda update, setup, start, hook=hook: old.MaskingHook.encode(hook, update, setup), answer=True)
                hook.respond = before._timed(h, hook.respond, answer=True)
            return {
                "plaintext": TimedFederation(plain_config),
                "before": before,
                "one domain": TimedFederation(mask_config, {h: Trust(record=records[h]) for h in identities}),
                "cross-site": TimedFederation(mask_config, {h: Trust(fewest=2, roster=roster, identity=identities[h], record=records[h])
                                                            for h in identities}),
            }

        for size in sizes:
            updates = random_updates(mask_config, 1, size, seed=1, scale=0.01)
            seconds: dict[str, list[float]] = {}
            for run in range(repeats):
                for name, federation in federations(run).items():
                    seconds.setdefault(name, []).append(added_seconds(federation, updates))
            median = {name: statistics.median(s) for name, s in seconds.items()}
            over = {name: median[name] - median["plaintext"] for name in median}
            print(f"{size:>11,} {median['plaintext']:>10.3f} {median['before']:>8.3f} {median['one domain']:>11.3f} {median['cross-site']:>11.3f} "
                  f"{over['one domain'] / over['before']:>18.2f} {over['cross-site'] / over['before']:>18.2f}")


def pipeline_costs(config_path: Path, data: Path | None, rounds: int, settings: list[str]) -> None:
    """Each hook through the real pipeline on an embedded Ray, all in this one invocation."""
    shown = " ".join(settings) or "as configured"
    hospitals = sorted(p.name for p in data.iterdir() if p.name.startswith("hospital_")) if data else []
    if hospitals:  # every hospital of a demo-data folder, e.g. fedward demo-data --hospitals 8
        settings = [*settings, "hospitals=[" + ", ".join(f"{{name: {h}, data: {data / h}}}" for h in hospitals) + "]"]
        shown += f", the {len(hospitals)} hospitals in {data}"
    print(f"{config_path} through the pipeline, {rounds} rounds per hook, {shown}")
    print(f"{'hook':<11} {'median round s':>15} {'x plain':>8} {'KiB/hospital/round':>19} {'parameters':>11} {'AUROC':>6}")
    baseline = None
    with tempfile.TemporaryDirectory() as runs:
        for name, privacy in HOOKS.items():
            run = [f"run.name=bench-{name}", f"run.root={runs}", f"run.rounds={rounds}", "explain.enabled=false", *settings]
            run += [f"privacy.{section}.enabled=true" for section in privacy]
            config = load_config(config_path, run).with_paths_from(ROOT)
            Pipeline(config, progress=False).run()
            records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
            ledger = json.loads((config.run_dir / "privacy.json").read_text())
            seconds = statistics.median(r["seconds"] for r in records)
            baseline = baseline or seconds
            sent = [e["bytes_sent"] for r in ledger["rounds"] for e in r["hospitals"].values() if e["bytes_sent"]]
            size = load_checkpoint(config.run_dir).weights.size
            print(f"{name:<11} {seconds:>15.2f} {seconds / baseline:>8.2f} {statistics.mean(sent) / 1024:>19.1f} {size:>11,} {records[-1]['pooled']['auroc']:>6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, action="append", help="parameters per update (repeat for several; default 1,000,000)")
    parser.add_argument("--masking-cost", action="store_true", help="masking before and after the checks against a lying driver")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hospitals", type=int, default=8)
    parser.add_argument("--pipeline", type=Path, help="a config to run through the pipeline once per hook")
    parser.add_argument("--data", type=Path, help="with --pipeline: a demo-data folder whose hospitals replace the config's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="with --pipeline: config settings, as for fedward simulate")
    args = parser.parse_args()
    sizes = args.params or [1_000_000]
    if args.pipeline:
        pipeline_costs(args.pipeline, args.data, args.rounds, args.set)
    elif args.masking_cost:
        masking_costs(sizes, args.hospitals, args.repeats)
    else:
        for size in sizes:
            protocol_costs(size, args.hospitals)


if __name__ == "__main__":
    main()
