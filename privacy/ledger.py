"""The privacy ledger: what left each hospital, in what form, and the privacy spent so far.

Built from the run's metric records (the pipeline writes each round's privacy facts there, synced
before the round's checkpoint), so a resumed run's ledger is exactly that of its checkpointed
rounds. Every epsilon comes from `privacy.accounting`; none is summed by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedward.config import FedwardConfig
from fedward.types import DataCounts
from privacy import dp_fedavg, dp_sgd
from privacy.accounting import ACCOUNTANT, GaussianSteps, epsilon

# What leaves a hospital besides its update, in every run: none of it is covered by DP.
ALWAYS_PLAIN = (
    "data counts per split and skipped-input counts per reason",
    "training loss per round",
    "evaluation: loss, accuracy, AUROC, AUPRC and per-class histograms of scores (100 bins) on the held-out split",
    "explanations (when enabled): suppressed, optionally noised aggregates of SHAP values",
)


def dp_sgd_steps(metrics: Mapping[str, float]) -> GaussianSteps:
    """The DP-SGD steps a hospital reports having taken in a round."""
    return GaussianSteps(
        noise_multiplier=metrics["dp_sgd_noise_multiplier"],
        sample_rate=metrics["dp_sgd_sample_rate"],
        steps=int(metrics["dp_sgd_steps"]),
    )


def histories(records: Sequence[dict]) -> tuple[dict[str, list[GaussianSteps]], dict[str, list[GaussianSteps]]]:
    """Each hospital's patient-level (DP-SGD) and hospital-level (DP-FedAvg) steps so far."""
    patient: dict[str, list[GaussianSteps]] = {}
    hospital: dict[str, list[GaussianSteps]] = {}
    for r in records:
        p = r.get("privacy", {})
        for h, steps in p.get("dp_sgd", {}).items():
            patient.setdefault(h, []).append(GaussianSteps(**steps))
        if "dp_fedavg" in p:
            for h in p["dp_fedavg"]["participants"]:
                hospital.setdefault(h, []).append(GaussianSteps(**p["dp_fedavg"]["steps"]))
    return patient, hospital


def over_budget(config: FedwardConfig, records: Sequence[dict], planned: Sequence[str], counts: Mapping[str, DataCounts]) -> str | None:
    """Why the next round, with `planned` hospitals, would exceed a configured budget; None if it fits."""
    patient, hospital = histories(records)
    levels = []
    sgd, avg = config.privacy.dp_sgd, config.privacy.dp_fedavg
    if sgd.enabled and sgd.epsilon is not None:
        units = lambda h: counts[h].train_patients if sgd.unit == "patient" else counts[h].train_examples  # noqa: E731
        levels.append(("patient-level", sgd.epsilon, sgd.delta, patient, lambda h: dp_sgd.plan_round(config, units(h))))
    if avg.enabled and avg.epsilon is not None:
        levels.append(("hospital-level", avg.epsilon, avg.delta, hospital, lambda h: dp_fedavg.round_steps(config)))
    for level, budget, delta, history, next_steps in levels:
        for h in planned:
            after = epsilon([*history.get(h, []), next_steps(h)], delta)
            # A calibrated noise multiplier spends the budget exactly at the last round; allow rounding.
            if after > budget * (1 + 1e-6):
                return f"the next round would raise {h}'s {level} epsilon to {after:.3f}, above the budget {budget:g} (delta {delta:g})"
    return None


def round_entry(config: FedwardConfig, record: dict, spent: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """One round of the ledger: per hospital, what left it and the epsilon it has spent so far."""
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
            **{f"epsilon_{level}": values[h] for level, values in spent.items() if h in values},
        }
    entry = {"round": record["round"], "hospitals": hospitals, "protocol": p.get("protocol", {})}
    if "dp_fedavg" in p:
        entry["dp_fedavg"] = p["dp_fedavg"]
    return entry


def build_ledger(config: FedwardConfig, protocol: dict, records: Sequence[dict], stopped: str | None = None) -> dict[str, Any]:
    """The whole ledger, as written to privacy.json."""
    sgd, avg = config.privacy.dp_sgd, config.privacy.dp_fedavg
    rounds, spent = [], {}
    for i, record in enumerate(records):
        patient, hospital = histories(records[: i + 1])
        spent = {}
        if sgd.enabled:
            spent["patient"] = {h: epsilon(steps, sgd.delta) for h, steps in sorted(patient.items())}
        if avg.enabled:
            spent["hospital"] = {h: epsilon(steps, avg.delta) for h, steps in sorted(hospital.items())}
        rounds.append(round_entry(config, record, spent))
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
            "spent_epsilon": spent.get("patient", {}),
            "spent_epsilon_max": max(spent.get("patient", {}).values(), default=0.0),
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
            "spent_epsilon": spent.get("hospital", {}),
            "spent_epsilon_max": max(spent.get("hospital", {}).values(), default=0.0),
        }
    if differential_privacy:
        differential_privacy["accountant"] = ACCOUNTANT
        differential_privacy["randomness"] = "noise and sampling from the operating system's entropy: a DP run is not bit-for-bit reproducible"
    return {
        "transport": protocol,
        "differential_privacy": differential_privacy,
        "always_in_the_clear": list(ALWAYS_PLAIN),
        "rounds": rounds,
        "stopped": stopped,
    }
