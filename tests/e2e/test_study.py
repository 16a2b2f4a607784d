"""A study project outside fedward's checkout runs end to end with no change to fedward.

Its own packages are named `models` and `pipelines`, as a study's often are, and one module of each
imports another: fedward's own packages are fedward.models and fedward.pipelines in every
process, so the study's names are the study's. It brings a model, a task and a strategy with a
hospital half, each named by `target`, and runs with `fedward simulate` started in its folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from fedward.checkpoint import load_checkpoint, read_metrics
from tests.conftest import HOSPITALS, ehr_config

pytestmark = pytest.mark.e2e

FILES = {
    "models/__init__.py": "",
    "models/blocks.py": """
        from torch import nn

        def block(width_in, width_out):
            return nn.Sequential(nn.Linear(width_in, width_out), nn.ReLU())
    """,
    "models/nets.py": """
        from torch import nn

        from models.blocks import block

        def risk_net(input_shape, output_size, width=8):
            return nn.Sequential(block(input_shape[0], width), nn.Linear(width, output_size))
    """,
    "pipelines/__init__.py": "",
    "pipelines/weights.py": """
        def positive_weight(args):
            return float(args.get("positive_weight", 1.0))
    """,
    "pipelines/outcome.py": """
        import torch
        from torch import nn

        from fedward.tasks.binary import Binary
        from pipelines.weights import positive_weight

        class WeightedOutcome(Binary):
            '''A binary outcome whose positives weigh more in the loss (task.args.positive_weight).'''

            def loss(self, outputs, y, reduction="mean"):
                weight = torch.tensor(positive_weight(self.config.args))
                return nn.functional.binary_cross_entropy_with_logits(outputs.squeeze(1), y, pos_weight=weight, reduction=reduction)
    """,
    "pipelines/counting.py": """
        import torch

        from fedward.strategies import LocalTraining
        from fedward.strategies.fedavg import FedAvg

        class CountingTraining(LocalTraining):
            '''The hospital half: trains as FedAvg does and keeps how many rounds it trained in.'''

            def __init__(self, config):
                super().__init__(config)
                self.rounds = 0

            def train(self, round):
                self.rounds += 1
                return super().train(round)

            def state_dict(self):
                return {"rounds_trained": torch.tensor(self.rounds)}

            def load_state_dict(self, state, model):
                self.rounds = int(state["rounds_trained"]) if "rounds_trained" in state else 0

            def reset(self):
                self.rounds = 0

        class CountingFedAvg(FedAvg):
            '''The driver half: FedAvg that counts the updates it averaged (checkpointed).'''

            def __init__(self, config):
                super().__init__(config)
                self.averaged = 0

            def aggregate(self, round, current, updates, failures):
                self.averaged += len(updates)
                return super().aggregate(round, current, updates, failures)

            def local(self):
                return CountingTraining(self.config)

            def state_dict(self):
                return {"averaged": torch.tensor(self.averaged)}

            def load_state_dict(self, state):
                self.averaged = int(state["averaged"]) if state else 0
    """,
}


def write_study(folder: Path, demo_data: Path) -> Path:
    for name, text in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    raw = ehr_config(demo_data, folder / "runs", name="study", rounds=2)
    raw["run"]["root"] = "runs"  # relative: read from the study folder the run starts in
    raw["model"] = {"target": "models.nets:risk_net", "args": {"width": 12}}
    raw["task"] = {"target": "pipelines.outcome:WeightedOutcome", "args": {"positive_weight": 2.0}}
    raw["strategy"] = {"target": "pipelines.counting:CountingFedAvg"}
    raw["explain"] = {"enabled": False}
    (folder / "study.yaml").write_text(yaml.safe_dump(raw))
    return folder / "study.yaml"


def test_a_study_with_its_own_models_and_pipelines_packages_runs_with_no_change_to_fedward(demo_data, tmp_path, monkeypatch):
    study = tmp_path / "study"
    config = write_study(study, demo_data)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    done = subprocess.run([sys.executable, "-m", "fedward.pipelines", "simulate", str(config.name), "--no-progress"],
                          cwd=study, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = study / "runs" / "study"
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [sorted(r["participants"]) for r in records] == [list(HOSPITALS)] * 2 and records[-1]["pooled"]["auroc"] > 0.75

    # Both halves of the study's strategy ran: the driver's count is checkpointed, each hospital's kept in its own state.
    assert int(load_checkpoint(run_dir).strategy_state["averaged"]) == 6
    state = torch.load(next((study / "runs" / "sites" / "hospital_a").glob("runs/study-*/state/round_0002.pt")), weights_only=True)
    assert int(state["rounds_trained"]) == 2

    built = json.loads((run_dir / "manifest.json").read_text())["invocations"][-1]["model_built_with"]
    assert built["model.target"]["file"] == "models/nets.py" and built["task.target"]["file"] == "pipelines/outcome.py"
    assert built["strategy.target"]["file"] == "pipelines/counting.py"

    # The exported card rebuilds the study's model where the study lives, and refuses it once its code changed.
    from fedward.models.export import load_exported
    from fedward.errors import CheckpointError

    monkeypatch.syspath_prepend(str(study))
    loaded = load_exported(run_dir / "model", str(study))
    assert type(loaded.task).__name__ == "WeightedOutcome" and loaded.model[1].out_features == 1
    nets = study / "models" / "nets.py"
    nets.write_text(nets.read_text() + "\n# edited after the run\n")
    with pytest.raises(CheckpointError, match=r"the model's code models.nets:risk_net changed since it was exported"):
        subprocess_load(run_dir / "model", study, env)


def subprocess_load(model_dir: Path, study: Path, env: dict) -> None:
    """Load the exported model in a fresh process started in the study folder, as `fedward predict` would."""
    from fedward.errors import CheckpointError

    code = f"from fedward.models.export import load_exported\nload_exported({str(model_dir)!r}, {str(study)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=study, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise CheckpointError(done.stderr.strip().splitlines()[-1])


def test_a_study_inside_a_project_whose_top_has_its_own_models_folder_imports_its_own(demo_data, tmp_path):
    # As in a submitted job: the run starts in the shipped project, whose top holds fedward's
    # models/ and pipelines/ folders; the study's packages of the same names live in run.study_dir.
    project = tmp_path / "project"
    for name in ("models", "pipelines"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('the project top {name}/, not the study')\n")
    raw = yaml.safe_load(write_study(project / "studies" / "ward", demo_data).read_text())
    raw["run"].update({"study_dir": "studies/ward", "rounds": 1, "hosting": "in_process"})
    (project / "study.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "fedward.pipelines", "simulate", "study.yaml", "--no-progress"],
                          cwd=project, env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [sorted(r["participants"]) for r in read_metrics(project / "runs" / "study" / "metrics.jsonl")] == [list(HOSPITALS)]
    built = json.loads((project / "runs" / "study" / "manifest.json").read_text())["invocations"][-1]["model_built_with"]
    assert built["model.target"]["file"] == "models/nets.py" and built["task.target"]["file"] == "pipelines/outcome.py"
