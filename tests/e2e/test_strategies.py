"""Strategies other than FedAvg through the real pipeline on the demo EHR hospitals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedward.config import parse_config
from fedward.checkpoint import load_checkpoint
from fedward.pipelines.run import Pipeline
from fedward.strategies import STRATEGIES
from fedward.models.networks import build_model
from tests.conftest import ehr_config
from tests.e2e.pins import assert_pinned

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("strategy", [{"name": "fedyogi", "server_lr": 0.02}, {"name": "scaffold"}, {"name": "fedper"}, {"name": "ditto"}], ids=lambda s: s["name"])
def test_strategy_learns_on_the_demo_and_keeps_personal_layers_home(ray_session, demo_data, tmp_path, strategy):
    raw = ehr_config(demo_data, tmp_path, name=strategy["name"], rounds=3)
    raw["explain"] = {"enabled": False}
    raw["strategy"] = strategy
    if strategy["name"] == "scaffold":
        raw["train"]["momentum"] = 0.0  # its control update assumes plain SGD steps
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    assert_pinned(config.run_dir, strategy["name"])
    last = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["pooled"]["auroc"] >= 0.75, last["pooled"]
    ckpt = load_checkpoint(config.run_dir)
    assert not set(ckpt.layout.names) & STRATEGIES[strategy["name"]](config).personal_keys(build_model(config.model, (13,)))
    # Server moments and SCAFFOLD's control variate are checkpointed with the weights.
    assert bool(ckpt.strategy_state) == (strategy["name"] in ("fedyogi", "scaffold"))
    # The final models: the global one here unless layers stay at hospitals; each hospital's own in its area.
    assert (config.run_dir / "model" / "model.json").is_file() == (strategy["name"] != "fedper")
    own = [json.loads(p.read_text()) for p in (tmp_path / "sites").glob("*/runs/*/model/model.json")]
    assert sorted(m["hospital"] for m in own) == sorted(last["hospitals"]) and {m["round"] for m in own} == {3}
    if strategy["name"] == "ditto":  # each hospital's own model, evaluated beside the global one
        assert sorted(last["personal"]["hospitals"]) == sorted(last["hospitals"]) and last["personal"]["pooled"]["auroc"] >= 0.75


def test_every_hospital_sees_its_gain_from_federating(ray_session, demo_data, tmp_path):
    from fedward.explain.report import write_consortium_report

    raw = ehr_config(demo_data, tmp_path, name="gains", rounds=2)
    raw["explain"] = {"enabled": False}
    raw["strategy"] = {"name": "ditto", "fine_tune_epochs": 1, "local_only": True}
    raw["subgroups"] = {"sex": "sex", "age": "age", "age_bands": [50, 70]}
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    gains = json.loads((config.run_dir / "personalization.json").read_text())
    assert gains["round"] == 2 and set(gains["models"]) == {"global", "personal", "fine_tuned", "local_only"}
    assert gains["models"]["local_only"]["epochs"] == 2 * config.train.local_epochs
    for model in gains["models"].values():
        assert sorted(model["hospitals"]) == ["hospital_a", "hospital_b", "hospital_c"]
        assert all(0.5 < m["auroc"] <= 1.0 for m in model["hospitals"].values())
    last = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert gains["models"]["global"]["hospitals"]["hospital_a"]["auroc"] == last["hospitals"]["hospital_a"]["auroc"]
    groups = json.loads((config.run_dir / "subgroups.json").read_text())
    assert groups["round"] == 2 and not groups["failures"]
    assert set(groups["attributes"]["sex"]["pooled"]) == {"female", "male"}
    assert sorted(groups["attributes"]["age"]["hospitals"]) == ["hospital_a", "hospital_b", "hospital_c"]
    pooled = groups["attributes"]["sex"]["pooled"]["female"]
    assert pooled["positives"] == sum(h["female"]["positives"] for h in groups["attributes"]["sex"]["hospitals"].values() if "female" in h)
    assert groups["gaps"] and all(0 <= g["gap"] <= 1 for g in groups["gaps"])
    page = write_consortium_report(config.run_dir).read_text()
    assert "What each hospital gains" in page and "trained on its data alone" in page
    assert "Performance by patient group" in page and "Largest gaps between groups" in page


def test_a_run_with_two_model_widths_trains_and_evaluates_every_hospital(ray_session, demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path, name="heterofl", rounds=3)
    raw["explain"] = {"enabled": False}
    raw["hospitals"][2]["model"] = {"width": 0.5}
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["participants"]) for r in records] == [["hospital_a", "hospital_b", "hospital_c"]] * 3
    assert all(sorted(r["hospitals"]) == ["hospital_a", "hospital_b", "hospital_c"] for r in records)
    assert records[-1]["pooled"]["auroc"] >= 0.75 and records[-1]["hospitals"]["hospital_c"]["auroc"] >= 0.7
    ckpt = load_checkpoint(config.run_dir)
    assert ckpt.layout.shapes[0] == (32, ckpt.layout.shapes[0][1])  # the global model keeps its full width
    assert json.loads((config.run_dir / "model" / "model.json").read_text())["model"]["hidden"] == [32, 16]
    own = {m["hospital"]: m for m in (json.loads(p.read_text()) for p in (tmp_path / "sites").glob("*/runs/*/model/model.json"))}
    assert own["hospital_c"]["model"]["hidden"] == [16, 8] and own["hospital_a"]["model"]["hidden"] == [32, 16]


def test_model_selection_hands_on_the_best_validation_round_and_stops_when_it_stops_improving(ray_session, demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path, name="selection", rounds=8)
    raw["explain"] = {"enabled": False}
    raw["train"].update(validation_fraction=0.2, select="best", patience=2, lr=0.3)  # a large step: validation soon stops improving
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    chosen = json.loads((config.run_dir / "selection.json").read_text())
    figures = [r["validation"]["pooled"]["auroc"] for r in records]
    assert chosen["best_round"] == records[int(np.argmax(figures))]["round"] and chosen["best_value"] == max(figures)
    if chosen["stopped_after"] is not None:  # stopped early: exactly patience rounds after the best one
        assert records[-1]["round"] == chosen["stopped_after"] == chosen["best_round"] + 2
    # The exported global model is the chosen round's, and its card says so.
    card = json.loads((config.run_dir / "model" / "model.json").read_text())
    assert card["round"] == chosen["best_round"]
    gains = json.loads((config.run_dir / "personalization.json").read_text())
    assert gains["chosen_round"] == chosen["best_round"]
    assert gains["models"]["global"]["pooled"] == records[chosen["best_round"] - 1]["pooled"]
