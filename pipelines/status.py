"""`fedward status`: where a run directory stands, read from its files alone."""

from __future__ import annotations

import json
from pathlib import Path

from fedward import release
from fedward.errors import CheckpointError
from fedward.checkpoint import load_checkpoint, read_metrics
from fedward.pipelines.selection import reported
from fedward.tasks import TASKS


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_status(run_dir: Path) -> str:
    identity = run_dir / "run.json"
    if not identity.is_file():
        raise CheckpointError(f"{run_dir} is not a fedward run directory (no run.json)")
    try:
        config = json.loads(identity.read_text())["identity"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{identity} is corrupt ({e})") from None
    lines = [f"run {config['run']['name']} in {run_dir}"]
    data = run_dir / "data.json"
    if data.is_file():
        body = json.loads(data.read_text())
        for name, c in body["hospitals"].items():
            skipped = release.total(c["skipped"])
            lines.append(f"  {name}: {c['train_examples']} training / {c['holdout_examples']} held-out samples, {skipped} skipped")
        for name, why in body["refused"].items():
            lines.append(f"  {name}: did not join: {why}")
    total = config["run"]["rounds"]
    # The checkpoint, not the metrics, says which rounds are done: a line written just before a
    # crash belongs to a round that a resume redoes.
    ckpt = load_checkpoint(run_dir, warn=lambda msg: lines.append(f"  warning: {msg}"))
    if ckpt is None:
        lines.append(f"  no round finished yet (of {total})")
        return "\n".join(lines)
    ledger = json.loads((run_dir / "privacy.json").read_text()) if (run_dir / "privacy.json").is_file() else {}
    selected = reported(run_dir)
    if ledger.get("stopped"):
        state = f"stopped by the privacy budget {ledger['stopped']}"
    elif selected.get("stopped_after") == ckpt.round:
        state = f"finished: stopped early by train.patience; the best validation round was {selected['best_round']}"
    else:
        state = "finished" if ckpt.round >= total else "stopped; run it again to resume"
    record = next((r for r in read_metrics(run_dir / "metrics.jsonl") if r["round"] == ckpt.round), None)
    pooled = record["pooled"] if record else {}
    shown = TASKS[(config.get("task") or {}).get("kind") or "binary"].figures

    def figures(m: dict) -> str:
        return m.get("held_back") or ", ".join(f"{name} {_figure(m.get(key))}" for key, name in shown)

    lines.append(f"  round {ckpt.round} of {total} ({state}): pooled {figures(pooled)}, loss {_figure(pooled.get('loss'))}")
    for name, m in (record or {}).get("hospitals", {}).items():
        lines.append(f"    {name}: {figures(m)}")
    if ledger:
        lines.append(f"  privacy: updates travelled {ledger['transport']['form']}")
        for level, dp in ledger["differential_privacy"].items():
            if isinstance(dp, dict):
                budget = "no budget" if dp["budget_epsilon"] is None else f"budget {dp['budget_epsilon']:g}"
                lines.append(f"    {level.replace('_', '-')} DP: epsilon spent at most {dp['spent_epsilon_max']:.3f} ({budget}, delta {dp['delta']:g})")
    return "\n".join(lines)
