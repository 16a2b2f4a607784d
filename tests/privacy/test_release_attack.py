"""An attacker holding every round's released evaluation, every global model and every held-out
patient's features reads no outcome with certainty and guesses no better than the hospital's
prevalence allows; the same attacker reads a fifth of the outcomes from the release before the
release policy (reproduced below as the fixture `release_before_policy`).

The hospitals are built directly and federated by plain FedAvg here, so the models are those of a
run; what each hospital releases is what `Hospital.evaluate` returns, written as a run's records
write it.
"""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np
import pytest
import torch
import yaml

from fedward.actors.hospital import Hospital
from fedward import metrics
from fedward.config import parse_config
from fedward.data_adapters.harmonize import merge_summaries
from fedward.files import json_safe
from fedward.models.flat import flatten, load_flat
from fedward.models.networks import build_model
from fedward.models.training import outputs
from fedward.pipelines.records import evaluation_record
from fedward import pooling
from fedward.subgroups import group_labels
from fedward.types import Evaluation, GroupBins, RoundPlan
from tests.conftest import HOSPITALS, ehr_config, image_config
from tests.e2e.test_tasks import diabetes_config, diabetes_sites, digit_sites, digits_config  # noqa: F401 (fixtures)
from tests.privacy.attack import attack, constraints, place

ADVANTAGE = 0.10  # the most the attacker's accuracy may beat the hospital's prevalence by


def release_before_policy(scores: np.ndarray, labels: np.ndarray) -> dict:
    """What a hospital released of a round before the release policy (commit 0e9f19b): per-class
    counts over 100 score slices of 0.01."""
    slices = np.clip((scores * 100).astype(np.int64), 0, 99)
    return {"positive_hist": np.bincount(slices[labels == 1], minlength=100).tolist(),
            "negative_hist": np.bincount(slices[labels == 0], minlength=100).tolist()}


def federate(config, rounds: int) -> list[tuple[Hospital, list[tuple[np.ndarray, dict, Evaluation]], GroupBins]]:
    """FedAvg over the demo hospitals; per hospital, each round's held-out scores (as the attacker
    computes them from the global model), the hospital's released evaluation of that round and its
    record, and the last model's figures per patient group."""
    hospitals = [Hospital(name, config, "attack") for name in HOSPITALS]
    for h in hospitals:
        h.load()
    spec = merge_summaries([h.summarize() for h in hospitals], config.data.table).to_dict() if config.data.kind == "table" else None
    task = hospitals[0].task
    scale = task.scale([h.summarize_targets() for h in hospitals]) if task.agrees_scale else None
    shape = {h.prepare(spec, scale) for h in hospitals}.pop()
    pooling.deal(HOSPITALS, pooling.in_process([h.evaluation_key for h in hospitals]))
    torch.manual_seed(0)
    model = build_model(config.model, shape, hospitals[0].task.output_size)
    weights, layout = flatten(model)
    seen = {h.name: [] for h in hospitals}
    for r in range(1, rounds + 1):
        updates = [h.fit(RoundPlan(r, h.name, seed=r, local_epochs=config.train.local_epochs, lr=config.train.lr), weights, layout) for h in hospitals]
        weights = weights + sum(u.delta * u.weight for u in updates) / sum(u.weight for u in updates)
        load_flat(model, weights, layout)
        for h in hospitals:
            evaluation = h.evaluate(r, weights, layout)
            record = json.loads(json.dumps(json_safe(evaluation_record(evaluation, None))))
            out = outputs(model, h.x[h.holdout_idx])
            # The attacker's own scores: a binary model's probability, a multiclass one's per class, a
            # regression's prediction in the target's units (the agreed scale is in the run directory).
            scores = {"binary": lambda: torch.sigmoid(out.squeeze(1)).numpy(), "multiclass": lambda: torch.softmax(out, 1).numpy(),
                      "regression": lambda: task.predictions(out, scale)["prediction"]}[task.kind]().astype(np.float64)
            seen[h.name].append((scores, record, evaluation))
    return [(h, seen[h.name], h.evaluate_subgroups(weights, layout) if config.subgroups.attributes else None) for h in hospitals]


def outcomes(federated, before_policy: bool) -> list[dict]:
    """The attack on each hospital, with what it would have had to beat: on what the hospitals
    released, or on what they would have released before the policy."""
    out = []
    for h, rounds, by_group in federated:
        labels = h.y[h.holdout_idx].numpy().astype(np.int64)
        told = [c for scores, record, _ in rounds for c in constraints(release_before_policy(scores, labels) if before_policy else record, scores)]
        last_scores = rounds[-1][0]
        groups = group_labels({k: v[h.holdout_idx] for k, v in h.samples.attributes.items()}, h.config.subgroups)
        for attribute, released in by_group.groups.items():
            for group, bins in released.items():
                member = groups[attribute] == group
                entry = release_before_policy(last_scores[member], labels[member]) if before_policy else bins.statistics()
                told += constraints(entry, last_scores, among=member)
        found = attack(told, prior=last_scores)
        prevalence = labels.mean()
        out.append({
            "hospital": h.name,
            "patients": len(labels),
            "certain": float(found.certain.mean()),
            "certain_right": bool((found.guess[found.certain] == labels[found.certain]).all()),
            "accuracy": float((found.guess == labels).mean()),
            "majority": float(max(prevalence, 1 - prevalence)),
            # The model's ranking with the hospital's released class counts: its positives are
            # guessed to be its highest-scored patients.
            "model": float((np.isin(np.arange(len(labels)), np.argsort(-last_scores)[: labels.sum()]) == labels).mean()),
        })
    return out


@pytest.fixture(scope="module", params=["ehr", "images"])
def federated(request, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    raw = ehr_config(demo_data, root) if request.param == "ehr" else image_config(demo_data, root)
    demo = yaml.safe_load((Path(__file__).parents[2] / "configs" / f"demo_{request.param}.yaml").read_text())
    config = parse_config({**raw, "subgroups": demo["subgroups"]})
    return federate(config, rounds=4 if request.param == "ehr" else 3)


def test_the_attack_reads_outcomes_from_the_release_before_the_policy(federated):
    found = outcomes(federated, before_policy=True)
    print(found)
    assert all(f["certain_right"] for f in found)
    certain = sum(f["certain"] * f["patients"] for f in found) / sum(f["patients"] for f in found)
    assert certain >= 0.20, found


def test_the_released_records_give_the_attacker_no_outcome_and_no_better_guess_than_prevalence(federated):
    found = outcomes(federated, before_policy=False)
    print(found)
    for f in found:
        assert f["certain"] == 0, f
        assert f["accuracy"] - max(f["majority"], f["model"]) <= ADVANTAGE, f


def test_the_pooled_auroc_is_within_two_hundredths_of_the_exact_one(federated):
    hospitals = [h for h, *_ in federated]
    for r in range(len(federated[0][1])):
        pooled = pooling.pooled([seen[r][2].padded for _, seen, _ in federated], lambda name, summed: hospitals[HOSPITALS.index(name)].open_pooled(summed))
        # Exact, from every held-out patient's score.
        labels = np.concatenate([h.y[h.holdout_idx].numpy() for h in hospitals])
        exact = metrics.auroc(labels, np.concatenate([seen[r][0] for _, seen, _ in federated]))
        print(f"round {r + 1}: pooled AUROC {pooled['auroc']:.3f} (exact within ±{pooled['auroc_error_bound']:.4f}), exact {exact:.4f}")
        assert abs(pooled["auroc"] - exact) <= min(0.02, pooled["auroc_error_bound"] + 0.0005)  # rounded to 3 decimals


# -- multiclass: each class against the rest, as a hospital releases it --------------------------


@pytest.fixture(scope="module")
def digits(digit_sites, tmp_path_factory):
    config = parse_config(digits_config(digit_sites, tmp_path_factory.mktemp("digits-attack")))
    return config, federate(config, rounds=3)


def test_no_class_of_a_multiclass_task_is_read_from_what_its_hospitals_release(digits):
    config, federated = digits
    for h, rounds, _ in federated:
        labels = h.y[h.holdout_idx].numpy()
        before, after = [], []
        for c, name in enumerate(config.task.classes):
            is_c = (labels == c).astype(np.int64)
            if not is_c.any():
                continue
            for told, kept in ((before, True), (after, False)):
                constraints_c = []
                for scores, record, _ in rounds:
                    entry = release_before_policy(scores[:, c], is_c) if kept else {
                        **{k.split("/", 1)[1]: v for k, v in record.items() if k.startswith(f"{name}/")},
                        "auroc": record.get("class_auroc", {}).get(name),
                    }
                    if not kept and "positive_bins" in entry:
                        entry["positives"] = sum(entry["positive_bins"])
                    constraints_c += constraints(entry, scores[:, c])
                found = attack(constraints_c, prior=rounds[-1][0][:, c])
                k = int(is_c.sum())
                ranked = np.isin(np.arange(len(is_c)), np.argsort(-rounds[-1][0][:, c])[:k])
                told.append((found.certain.mean(), (found.guess == is_c).mean() - max(1 - is_c.mean(), (ranked == is_c).mean())))
        print(h.name, "before", [f"{c:.2f}" for c, _ in before], "after", [f"{g:+.3f}" for _, g in after])
        assert np.mean([c for c, _ in before]) >= 0.20  # the old release gave classes away
        assert all(c == 0 and gain <= ADVANTAGE for c, gain in after)


# -- regression: the target's bin in the predicted-against-observed table -----------------------


@pytest.fixture(scope="module")
def diabetes(diabetes_sites, tmp_path_factory):
    runs = tmp_path_factory.mktemp("diabetes-attack")
    for h in HOSPITALS:  # ~110 held-out patients in all: at the default floor no cell of the table leaves; at 3 some do
        (runs / "sites" / h).mkdir(parents=True)
        (runs / "sites" / h / "policy.yaml").write_text("release_floor: 3\n")
    config = parse_config(diabetes_config(diabetes_sites, runs))
    return config, federate(config, rounds=4)


def test_no_target_of_a_regression_task_is_placed_by_what_its_hospitals_release(diabetes):
    config, federated = diabetes
    hospitals = [h for h, *_ in federated]
    scale = hospitals[0].scale
    # The table's bins, as the report states them: half a standard deviation wide around the mean.
    edges = scale["mean"] + scale["sd"] * np.linspace(-3, 3, 13)[1:-1]
    observed = np.concatenate([h.y[h.holdout_idx].numpy() * scale["sd"] + scale["mean"] for h in hospitals])
    truth = np.searchsorted(edges, observed)
    n = len(observed)
    before, after = [], []
    for r in range(len(federated[0][1])):
        predicted = np.searchsorted(edges, np.concatenate([seen[r][0] for _, seen, _ in federated]))
        at = 0
        for h, seen, _ in federated:  # before the policy: each hospital's own table, every cell
            mine = np.zeros(n, bool)
            mine[at : at + len(seen[r][0])] = True
            at += len(seen[r][0])
            counts = np.zeros((12, 12), np.int64)
            np.add.at(counts, (predicted[mine], truth[mine]), 1)
            before += [(mine & (predicted == row), {j: int(c) for j, c in enumerate(counts[row])}) for row in range(12)]
        pooled = pooling.pooled([seen[r][2].padded for _, seen, _ in federated], lambda name, summed: hospitals[HOSPITALS.index(name)].open_pooled(summed))
        after += [(predicted == row, {j: c for j, c in enumerate(cells) if c is not None}) for row, cells in enumerate(pooled["calibration"])]
    assert any(counts for _, counts in after)  # some cells were released
    model_bin = predicted  # the last model's own guess of each patient's bin
    for tables, name in ((before, "before"), (after, "after")):
        possible = place(tables, n, 12)
        certain = possible.sum(axis=1) == 1
        guess = np.array([min(np.flatnonzero(p), key=lambda j: abs(j - m)) for p, m in zip(possible, model_bin)])
        baseline = max((model_bin == truth).mean(), np.bincount(truth).max() / n)
        print(f"{name}: placed with certainty {certain.mean():.3f}, guessed {(guess == truth).mean():.3f}, without the release {baseline:.3f}")
        assert (possible[np.arange(n), truth]).all()  # the attack never rules out the truth
        if name == "before":
            assert certain.mean() >= 0.20
        else:
            assert not certain.any() and (guess == truth).mean() - baseline <= ADVANTAGE
