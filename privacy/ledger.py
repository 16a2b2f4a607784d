"""The privacy ledger: what left each hospital, in what form, and the privacy spent so far.

Two sources: the run's metric records, where the pipeline writes each round's privacy facts
(forms, bytes, the steps each optimizer reports) and the epsilon spent by then; and the spend log,
where the driver charges every hospital it asks to train before asking, and which a resume never
truncates. Every epsilon comes from `privacy.accounting`; none is summed by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedward import outflows
from fedward.config import FedwardConfig
from fedward.errors import CheckpointError
from fedward.files import append_lines
from fedward.privacy import dp_fedavg, dp_sgd
from fedward.privacy.accounting import ACCOUNTANT, GaussianSteps, epsilon

SPEND_LOG = "privacy_spend.jsonl"


def dp_sgd_steps(metrics: Mapping[str, float]) -> GaussianSteps:
    """The DP-SGD steps a hospital reports having taken in a round."""
    return GaussianSteps(
        noise_multiplier=metrics["dp_sgd_noise_multiplier"],
        sample_rate=metrics["dp_sgd_sample_rate"],
        steps=int(metrics["dp_sgd_steps"]),
    )


def record_spend(path: Path, entries: Sequence[dict]) -> None:
    """Append to a spend log, synced. Spending is logged before the training that spends it and
    never removed: a retried or resumed round, or an update lost on the way, is charged too."""
    append_lines(path, [json.dumps(e) for e in entries])


def read_spend(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:  # only the last line may be torn by a crash mid-write
                raise CheckpointError(f"{path}: line {i + 1} is corrupt; the privacy spent cannot be accounted") from None
    return entries


def spend_entries(config: FedwardConfig, round: int, attempt: int, hospitals: Sequence[str], units: Mapping[str, int]) -> list[dict]:
    """What asking `hospitals` to train in a round spends, per level; `units` per hospital for DP-SGD."""
    entries = []
    for h in hospitals:
        if config.privacy.dp_sgd.enabled:
            entries.append({"round": round, "attempt": attempt, "hospital": h, "level": "patient", "steps": asdict(dp_sgd.plan_round(config, units[h]))})
        if config.privacy.dp_fedavg.enabled:
            entries.append({"round": round, "attempt": attempt, "hospital": h, "level": "hospital", "steps": asdict(dp_fedavg.round_steps(config))})
    return entries


def histories(spend: Sequence[dict]) -> dict[str, dict[str, list[GaussianSteps]]]:
    """level -> hospital -> the mechanisms it has run so far."""
    out: dict[str, dict[str, list[GaussianSteps]]] = {}
    for e in spend:
        out.setdefault(e["level"], {}).setdefault(e["hospital"], []).append(GaussianSteps(**e["steps"]))
    return out


def spent(config: FedwardConfig, spend: Sequence[dict]) -> dict[str, dict[str, float]]:
    """level -> hospital -> epsilon spent, at the level's delta."""
    deltas = {"patient": config.privacy.dp_sgd.delta, "hospital": config.privacy.dp_fedavg.delta}
    return {level: {h: epsilon(steps, deltas[level]) for h, steps in sorted(by.items())} for level, by in sorted(histories(spend).items())}


def exceeds(spent: float, budget: float | None) -> bool:
    """Whether an epsilon passes its budget. A calibrated noise multiplier spends the budget exactly
    at the last round, so rounding is allowed."""
    return budget is not None and spent > budget * (1 + 1e-6)


def over_budget(config: FedwardConfig, spend: Sequence[dict], next_round: Sequence[dict]) -> str | None:
    """Why spending `next_round` on top of `spend` would exceed a configured budget; None if it fits."""
    budgets = {
        "patient": (config.privacy.dp_sgd.epsilon, config.privacy.dp_sgd.delta),
        "hospital": (config.privacy.dp_fedavg.epsilon, config.privacy.dp_fedavg.delta),
    }
    before, after = histories(spend), histories([*spend, *next_round])
    for level, by in sorted(after.items()):
        budget, delta = budgets[level]
        for h, steps in sorted(by.items()):
            eps = epsilon(steps, delta)
            if len(steps) > len(before.get(level, {}).get(h, [])) and exceeds(eps, budget):
                return f"the next round would raise {h}'s {level}-level epsilon to {eps:.3f}, above the budget {budget:g} (delta {delta:g})"
    return None


def round_entry(record: dict) -> dict[str, Any]:
    """One round of the ledger: per hospital, what left it and the epsilon it had spent by then."""
    p = record.get("privacy", {})
    noised = "dp_fedavg" in p and p["dp_fedavg"]["noise"] == "distributed"
    hospitals = {}
    for h in sorted(set(record["participants"]) | set(p.get("sent_bytes", {}))):
        update_form = p.get("form", "plain") if h in record["participants"] else "none (dropped out)"
        if h in p.get("dp_fedavg", {}).get("participants", ()):
            update_form += ", clipped" + (", with its noise share" if noised else "")
        if h in p.get("dp_sgd", {}):
            update_form += ", trained with DP-SGD"
        hospitals[h] = {
            "update": update_form,
            "bytes_sent": p.get("sent_bytes", {}).get(h),
            "dp_sgd": p.get("dp_sgd", {}).get(h),
            **{f"epsilon_{level}": values[h] for level, values in p.get("epsilon", {}).items() if h in values},
        }
    entry = {"round": record["round"], "hospitals": hospitals, "protocol": p.get("protocol", {})}
    if "dp_fedavg" in p:
        entry["dp_fedavg"] = p["dp_fedavg"]
    return entry


def _collusion(config: FedwardConfig, records: Sequence[dict]) -> dict[str, Any]:
    """Under distributed noise, the largest spend's ε by how many of a round's hospitals collude
    with the driver, for the fewest colluders any hospital's policy assumed."""
    rounds = [r["privacy"]["dp_fedavg"] for r in records if r.get("privacy", {}).get("dp_fedavg", {}).get("fewest")]
    if not rounds:  # central noise, which no hospital can take out, or a run recorded before
        return {}
    taken = max(sum(h in r["participants"] for r in rounds) for h in {h for r in rounds for h in r["participants"]})
    assumed = min((c for r in rounds for c in r.get("colluders_assumed", {}).values()), default=0)
    fewest = min(r["fewest"] for r in rounds)
    by = dp_fedavg.epsilon_by_colluders(config, fewest, assumed, taken)
    return {"colluders_assumed": assumed, "epsilon_by_colluders": {str(c): e for c, e in by.items()}}


def build_ledger(config: FedwardConfig, protocol: dict, records: Sequence[dict], spend: Sequence[dict], stopped: str | None = None) -> dict[str, Any]:
    """The whole ledger, as written to privacy.json: the rounds from the metric records, the
    epsilon spent from the spend log (which also holds retried and redone rounds)."""
    sgd, avg = config.privacy.dp_sgd, config.privacy.dp_fedavg
    rounds = [round_entry(r) for r in records]
    spent_now = spent(config, spend)
    differential_privacy = {}
    if sgd.enabled:
        differential_privacy["patient_level"] = {
            "mechanism": "DP-SGD (Opacus): Poisson-sampled units, per-unit gradient clipping, Gaussian noise",
            "unit": sgd.unit,
            "guarantee": (
                "per patient: all of a patient's samples are sampled and clipped together"
                if sgd.unit == "patient" else "per sample only: a patient with several samples is protected less"
            ),
            "max_grad_norm": sgd.max_grad_norm,
            "delta": sgd.delta,
            "budget_epsilon": sgd.epsilon,
            "spent_epsilon": spent_now.get("patient", {}),
            "spent_epsilon_max": max(spent_now.get("patient", {}).values(), default=0.0),
        }
    if avg.enabled:
        differential_privacy["hospital_level"] = {
            "mechanism": "DP-FedAvg: updates clipped in L2 norm, each hospital counts once, Gaussian noise on the sum",
            "clip_norm": avg.clip_norm,
            "noise_multiplier": dp_fedavg.noise_multiplier(config),
            "noise_added_by": "the driver" if protocol.get("form") == "plain" else "the hospitals, in shares (the driver sees only noised sums)",
            "sampling": "hospitals chosen by the driver: no amplification by sampling claimed",
            "delta": avg.delta,
            "budget_epsilon": avg.epsilon,
            "spent_epsilon": spent_now.get("hospital", {}),
            "spent_epsilon_max": max(spent_now.get("hospital", {}).values(), default=0.0),
            **_collusion(config, records),
        }
    if differential_privacy:
        differential_privacy["accountant"] = ACCOUNTANT
        differential_privacy["randomness"] = "noise and sampling from the operating system's entropy: a DP run is not bit-for-bit reproducible"
    return {
        "transport": protocol,
        "differential_privacy": differential_privacy,
        "released": outflows.ledger_rows(),  # every field that leaves a hospital, and its protection
        "rounds": rounds,
        "stopped": stopped,
    }
