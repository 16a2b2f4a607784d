"""The manifest records what each invocation built the model with, and a resume must match it."""

from __future__ import annotations

import pytest

from fedward.errors import CheckpointError
from fedward.pipelines.manifest import record_builds, record_invocation


def test_a_resume_with_other_study_code_is_refused_naming_what_changed(tmp_path):
    built = {"fedward": "0.1.0", "torch": "2.13.0", "model.target": {"target": "nets:make", "file": "nets.py", "sha256": "a" * 64}}
    record_invocation(tmp_path, "hash", 0)
    record_builds(tmp_path, built)
    record_invocation(tmp_path, "hash", 2)
    record_builds(tmp_path, built)  # the same code: the run goes on
    record_invocation(tmp_path, "hash", 3)
    edited = {**built, "model.target": {**built["model.target"], "sha256": "b" * 64}}
    with pytest.raises(CheckpointError, match=r"the run began with other code \(model.target: .*'aaaa.* -> .*'bbbb"):
        record_builds(tmp_path, edited)
