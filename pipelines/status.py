"""`fedward status`: where a run directory stands, read from its files alone."""

from __future__ import annotations

import json
from pathlib import Path

from fedward.errors import CheckpointError


def run_status(run_dir: Path) -> str:
    identity = run_dir / "run.json"
    if not identity.is_file():
        raise CheckpointError(f"{run_dir} is not a fedward run directory (no run.json)")
    config = json.loads(identity.read_text())["config"]
    lines = [f"run {config['run']['name']} in {run_dir}"]
    data = run_dir / "data.json"
    if data.is_file():
        body = json.loads(data.read_text())
        for name, c in body["hospitals"].items():
            skipped = sum(c["skipped"].values())
            lines.append(f"  {name}: {c['train_examples']} training / {c['holdout_examples']} held-out samples, {skipped} skipped")
        for name, why in body["refused"].items():
            lines.append(f"  {name}: did not join: {why}")
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.is_file() else []
    total = config["run"]["rounds"]
    if not records:
        lines.append(f"  no round finished yet (of {total})")
        return "\n".join(lines)
    last = records[-1]
    pooled = last["pooled"]
    state = "finished" if last["round"] >= total else "stopped; run it again to resume"
    lines.append(
        f"  round {last['round']} of {total} ({state}): pooled AUROC {pooled['auroc']:.3f}, "
        f"AUPRC {pooled['auprc']:.3f}, accuracy {pooled['accuracy']:.3f}, loss {pooled['loss']:.4f}"
    )
    for name, m in last["hospitals"].items():
        lines.append(f"    {name}: AUROC {m['auroc']:.3f}, AUPRC {m['auprc']:.3f}, accuracy {m['accuracy']:.3f}")
    return "\n".join(lines)
