"""Strategies other than FedAvg through the real pipeline on the demo EHR hospitals."""

from __future__ import annotations

import json

import pytest

from fedward.config import parse_config
from pipelines.checkpoint import load_checkpoint
from pipelines.run import Pipeline
from pipelines.strategies import STRATEGIES
from tests.conftest import ehr_config

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("strategy", [{"name": "fedyogi", "server_lr": 0.02}, {"name": "scaffold"}, {"name": "fedper"}, {"name": "ditto"}], ids=lambda s: s["name"])
def test_strategy_learns_on_the_demo_and_keeps_personal_layers_home(ray_session, demo_data, tmp_path, strategy):
    raw = ehr_config(demo_data, tmp_path, name=strategy["name"], rounds=3)
    raw["explain"] = {"enabled": False}
    raw["strategy"] = strategy
    config = parse_config(raw)
    Pipeline(config, progress=False).run()
    last = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["pooled"]["auroc"] >= 0.75, last["pooled"]
    ckpt = load_checkpoint(config.run_dir)
    assert not set(ckpt.layout.names) & STRATEGIES[strategy["name"]](config).personal_keys()
    # Server moments and SCAFFOLD's control variate are checkpointed with the weights.
    assert bool(ckpt.strategy_state) == (strategy["name"] in ("fedyogi", "scaffold"))
    # The final models: the global one here unless layers stay at hospitals; each hospital's own in its area.
    assert (config.run_dir / "model" / "model.json").is_file() == (strategy["name"] != "fedper")
    own = [json.loads(p.read_text()) for p in (tmp_path / "sites").glob("*/runs/*/model/model.json")]
    assert sorted(m["hospital"] for m in own) == sorted(last["hospitals"]) and {m["round"] for m in own} == {3}
    if strategy["name"] == "ditto":  # each hospital's own model, evaluated beside the global one
        assert sorted(last["personal"]["hospitals"]) == sorted(last["hospitals"]) and last["personal"]["pooled"]["auroc"] >= 0.75
