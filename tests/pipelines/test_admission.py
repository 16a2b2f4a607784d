"""Answers that cannot enter the aggregate: wrong sender, round, layout, values or counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedward.config import parse_config
from fedward.types import Layout, SealedUpdate, Update
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.pipelines import admission
from fedward.strategies import STRATEGIES
from tests.conftest import ehr_config

LAYOUT = Layout(("w", "b"), ((3, 2), (3,)))


def good(**changes) -> Update:
    update = Update(4, "hospital_a", np.zeros(9, np.float32), LAYOUT, 20, 20.0)
    return dataclasses.replace(update, **changes)


LAYOUTS, EXAMPLES = {"hospital_a": LAYOUT, "hospital_b": LAYOUT}, {"hospital_a": 20, "hospital_b": 20}


@pytest.mark.parametrize(
    "answer, reason",
    [
        ({"w": 1}, "sent a dict, not a plain update"),
        (SealedUpdate(4, "hospital_a", "masked", b"", LAYOUT, 20), "sent a SealedUpdate, not a plain update"),
        (good(hospital="hospital_b"), "labelled as from 'hospital_b'"),
        (good(round=3), "for round 3, not 4 (late or replayed)"),
        (good(round=np.arange(3)), "cannot be checked (ValueError)"),
        (good(layout=Layout(("w",), ((3, 2),)), delta=np.zeros(6, np.float32)), "layout (6 values in 1 entries) is not its model's (9 in 2)"),
        (good(layout=None), "cannot be checked (AttributeError)"),
        (good(num_examples=0), "claims 0 training examples, not the 20 it joined with"),
        (good(num_examples=2000, weight=2000.0), "claims 2000 training examples"),
        (good(metrics=[1]), "training metrics are not finite numbers"),
        (good(metrics={"train_loss": float("nan")}), "training metrics are not finite numbers"),
        (good(delta=np.zeros(8, np.float32)), "not 9 float32 values"),
        (good(delta=np.zeros(9, np.float64)), "not 9 float32 values"),
        (good(delta=np.array([0, 1, np.nan, 0, np.inf, 0, 0, 0, -np.inf], np.float32)), "holds 3 NaN or infinite values"),
    ],
)
def test_a_faulty_or_forged_update_is_refused_with_its_reason(answer, reason):
    admitted, refused = admission.admit(4, {"hospital_a": answer, "hospital_b": good(hospital="hospital_b")}, LAYOUTS, "plain", EXAMPLES)
    assert list(admitted) == ["hospital_b"] and reason in refused["hospital_a"]


def test_good_updates_pass_in_the_form_the_hook_expects_and_strangers_do_not():
    plain = good(num_examples=np.int64(20), weight=1.0)  # a numpy count, and DP-FedAvg's weight of one
    admitted, refused = admission.admit(4, {"hospital_a": plain, "mallory": good(hospital="mallory")}, LAYOUTS, "plain", EXAMPLES)
    assert admitted["hospital_a"] is plain and refused == {"mallory": "rejected: not a hospital of this run"}
    sealed = SealedUpdate(4, "hospital_b", "masked", b"\x00", LAYOUT, 20)
    admitted, refused = admission.admit(4, {"hospital_a": good(), "hospital_b": sealed}, LAYOUTS, "masked", EXAMPLES)
    assert admitted == {"hospital_b": sealed} and "sent a Update, not a masked update" in refused["hospital_a"]
    encrypted = SealedUpdate(4, "hospital_b", "encrypted", b"\x00", LAYOUT, 20)
    assert "not a masked update" in admission.admit(4, {"hospital_b": encrypted}, LAYOUTS, "masked", EXAMPLES)[1]["hospital_b"]


def test_each_hospital_is_held_to_its_own_models_layout(tmp_path):
    raw = ehr_config(tmp_path, tmp_path)
    raw["hospitals"][2]["model"] = {"width": 0.5}
    config = parse_config(raw)
    strategy = STRATEGIES["fedavg"](config)
    torch.manual_seed(0)
    layout = flatten(build_model(config.model, (13,)))[1]
    layouts = admission.expected_layouts(config, strategy, (13,), layout, 1, frozenset())
    assert layouts["hospital_a"] == layouts["hospital_b"] == layout
    assert layouts["hospital_c"].shapes[0] == (16, 13) and layouts["hospital_c"].names == layout.names

    raw = ehr_config(tmp_path, tmp_path)
    raw["strategy"], raw["train"]["momentum"] = {"name": "scaffold"}, 0.0
    scaffold = STRATEGIES["scaffold"](parse_config(raw))
    model = build_model(parse_config(raw).model, (13,))
    scaffold.start(model, layout)
    extended = admission.expected_layouts(parse_config(raw), scaffold, (13,), layout, 1, frozenset())["hospital_a"]
    assert extended.names[: len(layout.names)] == layout.names and extended.size == 2 * layout.size  # the MLP has no buffers


def test_a_huge_but_finite_change_is_not_mistaken_for_an_infinite_one():
    huge = good(delta=np.array([1e30, 0, 0, 0, 0, 0, 0, 0, -3e38], np.float32))  # its squared norm overflows float32
    admitted, refused = admission.admit(4, {"hospital_a": huge}, LAYOUTS, "plain", EXAMPLES)
    assert admitted == {"hospital_a": huge} and not refused
