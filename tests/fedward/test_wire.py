"""Cross-site messages as JSON: every protocol message survives the trip exactly, and nothing but
protocol messages can be built from what a peer sends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedward import wire
from fedward.pooling import PaddedStatistics
from fedward.privacy.masking import Advertisement, MaskingSetup, Unmask
from fedward.types import Evaluation, Layout, RoundPlan, SealedUpdate, Update


def trip(value):
    return wire.decode(json.loads(json.dumps(wire.encode(value), allow_nan=False)))


def test_protocol_messages_cross_as_json_exactly():
    layout = Layout(("body.weight", "head.bias"), ((3, 2), (1,)))
    delta = np.random.default_rng(0).standard_normal(7).astype(np.float32)
    messages = [
        Update(2, "hospital_a", delta, layout, 40, 40.0, {"train_loss": float("nan"), "steps": 3}),
        SealedUpdate(2, "hospital_a", "masked", np.arange(7, dtype="<u4") * 2**29, layout, 40),
        RoundPlan(2, "hospital_a", seed=7, local_epochs=1, lr=0.05),
        Advertisement(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 40.0, b"-----BEGIN", b"\x00\xff"),
        MaskingSetup(2, 0.25, {"hospital_a": b"k"}, {"hospital_b": b"s"}),
        Unmask(("hospital_a", "hospital_b"), (), {"hospital_a": b"sig"}),
        Evaluation(2, "hospital_a", 30, {"auroc": 0.81}, {"positive_bins": np.array([1, 2])}, PaddedStatistics("hospital_a", b"k", b"n", (("x", (2,)),), np.array([1, 2], np.uint64))),
        {("hospital_a", 1): [1, 2.5, None, True, "x"], "inf": float("-inf")},
    ]
    for message in messages:
        back = trip(message)
        assert type(back) is type(message)
        assert repr(back) == repr(message)  # arrays, bytes, tuples and non-finite numbers included
        assert wire.digest(back) == wire.digest(message)  # the driver names what it received as the hospital's audit log does


def test_a_digest_changes_with_any_value_and_counts_the_raw_bytes():
    delta = np.zeros(1000, np.float32)
    digest, size = wire.digest({"delta": delta})
    changed = delta.copy()
    changed[999] = np.float32(1e-30)
    assert wire.digest({"delta": changed})[0] != digest and size > delta.nbytes


@pytest.mark.parametrize("sent, says", [
    ({"$type": "Popen", "fields": {"args": ["rm", "-rf", "/"]}}, "'Popen' is not a protocol message"),
    ({"$type": "RoundPlan", "fields": {"round": 1, "hospital": "a", "seed": 1, "local_epochs": 1, "lr": 0.1, "code": "x"}}, r"unknown field\(s\) \['code'\]"),
    ({"$type": "RoundPlan", "fields": {"round": 1}}, "RoundPlan: .*missing"),
    ({"$array": "AAAA", "dtype": "|O", "shape": [1]}, "expected a numeric dtype"),
    ({"$array": "AAAA", "dtype": "<f4", "shape": [2]}, r"3 bytes do not hold \[2\] values"),
    ({"$bytes": "not base64!"}, "invalid base64"),
    ({"$float": "1e400"}, "expected nan, inf or -inf"),
])
def test_anything_else_is_refused_naming_what(sent, says):
    with pytest.raises(wire.WireError, match=says):
        wire.decode(sent)


def test_only_protocol_messages_are_sent():
    with pytest.raises(wire.WireError, match="is not a protocol message"):
        wire.encode(object())
    with pytest.raises(wire.WireError, match="an array of object"):
        wire.encode(np.array([object()]))
