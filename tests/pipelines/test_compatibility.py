"""Which settings run together follows from the components' declarations, and a refusal names both."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedward.config import parse_config
from fedward.declarations import CLEAR, Declaration, conflicts, require_compatible
from fedward.errors import ConfigError
from fedward.pipelines import compatibility
from fedward.pipelines.compatibility import cell, check, declarations, refusal

DOCS = Path(__file__).parents[2] / "docs" / "tasks-and-models.md"
DP_FEDAVG = {"privacy": {"dp_fedavg": {"enabled": True, "noise_multiplier": 1.0}}}


def with_(raw: dict, **sections) -> dict:
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value}
    return raw


def test_a_conflict_is_one_component_breaking_what_another_needs():
    summing = Declaration("privacy.sum", breaks={CLEAR: "shows only the sum"})
    comparing = Declaration("robust.compare", needs={CLEAR: "compares changes"})
    study = Declaration("study.step", needs={"a fact of the study's own": "reads it"})
    assert [(c.needing, c.breaking) for c in conflicts([summing, comparing, study])] == [(comparing, summing)]
    with pytest.raises(ConfigError, match=r"^robust.compare cannot run with privacy.sum: robust.compare compares changes, but privacy.sum shows only the sum$"):
        require_compatible([summing, study, comparing])
    require_compatible([comparing, study])
    assert [c.breaking.setting for c in conflicts([study, Declaration("study.other", breaks={"a fact of the study's own": "changes it"})])] == ["study.other"]


@pytest.mark.parametrize(
    "raw, needing, breaking",
    [
        (cell("binary", "strategy.name: fedavg") | {"strategy": {"name": "scaffold"}}, "strategy.name: scaffold", "train.momentum: 0.9"),
        (with_(cell("binary", "strategy.name: scaffold"), train={"optimizer": "adam"}), "strategy.name: scaffold", "train.optimizer: adam"),
        (with_(cell("binary", "strategy.name: scaffold"), privacy={"encryption": {"enabled": True, "layers": ["0.weight"]}}),
         "privacy.encryption.layers", "strategy.name: scaffold"),
        (cell("binary", "strategy.local_only", "privacy.dp_fedavg"), "privacy.dp_fedavg", "strategy.local_only"),
        (cell("binary", "strategy.name: ditto", "privacy.dp_fedavg"), "privacy.dp_fedavg", "strategy.name: ditto"),
        (cell("binary", "strategy.name: fedprox", "privacy.dp_sgd"), "privacy.dp_sgd", "strategy.name: fedprox"),
        (cell("binary", "strategy.name: fedbn", "privacy.dp_sgd"), "privacy.dp_sgd", "model.norm: batch"),
        (cell("binary", "strategy.name: scaffold", "privacy.dp_sgd"), "privacy.dp_sgd", "strategy.name: scaffold"),
        (cell("regression", "explain.enabled"), "explain.enabled", "task.kind: regression"),
        (cell("multiclass", "subgroups"), "subgroups", "task.kind: multiclass"),
        (cell("binary", "robust.rule: median", "privacy.masking"), "robust.rule: median", "privacy.masking"),
        (cell("binary", "robust.rule: krum", "privacy.encryption"), "robust.rule: krum", "privacy.encryption"),
        (cell("binary", "robust.rule: median", "privacy.dp_fedavg"), "privacy.dp_fedavg", "robust.rule: median"),
        (with_(cell("binary", "robust.rule: median"), run={"stale_weight": 0.5}), "run.stale_weight", "robust.rule: median"),
        (with_(cell("binary", "privacy.masking"), run={"stale_weight": 0.5}), "privacy.masking", "run.stale_weight"),
        (cell("binary", "robust.rule: fltrust", "strategy.name: scaffold"), "strategy.name: scaffold", "robust.rule: fltrust"),
        (cell("binary", "robust.rule: fltrust", "privacy.dp_sgd"), "robust.rule: fltrust", "privacy.dp_sgd"),
        (cell("binary", "compression.kind: int8", "privacy.masking"), "compression.kind: int8", "privacy.masking"),
        (cell("binary", "compression.kind: top_k", "privacy.encryption"), "compression.kind: top_k", "privacy.encryption"),
        (with_(cell("binary", "privacy.dp_fedavg"), privacy={"encryption": {"enabled": True, "layers": ["0.weight"]}}),
         "privacy.dp_fedavg", "privacy.encryption.layers"),
    ],
)
def test_settings_that_cannot_run_together_are_refused_naming_both(raw, needing, breaking):
    why = refusal(raw)
    assert why is not None and why.startswith(f"{needing} cannot run with {breaking}: {needing} "), why


@pytest.mark.parametrize("privacy", ["privacy.masking", "privacy.encryption", "privacy.dp_fedavg"])
def test_narrower_hospitals_are_refused_where_changes_are_summed_or_noised_in_one_shape(privacy):
    raw = cell("binary", privacy)
    raw["hospitals"][2]["model"] = {"width": 0.5}
    assert refusal(raw).startswith(f"{privacy} cannot run with hospitals.hospital_c.model.width: ")
    raw = cell("binary", "strategy.name: scaffold")
    raw["hospitals"][1]["model"] = raw["hospitals"][2]["model"] = {"width": 0.5}
    assert "strategy.name: scaffold cannot run with hospitals.hospital_b.model.width, hospitals.hospital_c.model.width" in refusal(raw)


def test_what_combines_is_let_through():
    assert refusal(cell("binary", "compression.kind: top_k", "privacy.dp_fedavg")) is None
    assert refusal(cell("binary", "robust.norm_bound", "privacy.masking")) is None  # enforced inside each hospital
    assert refusal(cell("regression", "privacy.dp_sgd", "compression.kind: int8", "strategy.name: fedadam")) is None
    settings = [d.setting for d in declarations(parse_config(cell("multiclass", "privacy.encryption", "compression.kind: int8")))]
    assert settings == ["task.kind: multiclass", "strategy.name: fedavg", "train.momentum: 0.9", "privacy.encryption", "compression.kind: int8"]


def test_a_study_task_that_is_not_binary_cannot_be_explained(tmp_path):
    (tmp_path / "ranked.py").write_text(
        "from fedward.tasks.multiclass import Multiclass\n\nclass Ranked(Multiclass):\n    pass\n"
    )
    raw = cell("multiclass", "explain.enabled")
    raw["task"]["target"] = "ranked:Ranked"
    with pytest.raises(ConfigError, match=r"^explain.enabled cannot run with task.target: ranked:Ranked: "):
        check(parse_config(raw), str(tmp_path))


def test_the_docs_table_is_the_one_the_declarations_give():
    text = DOCS.read_text()
    found = re.search(r"<!-- compatibility table: begin -->\n(.*?)<!-- compatibility table: end -->", text, re.S)
    assert found, f"{DOCS} has lost its generated compatibility table"
    assert found.group(1) == compatibility.table(), "regenerate it: python -m fedward.pipelines.compatibility"
