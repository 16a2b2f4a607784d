"""Final global weights pinned by sha256: a change that moves any weight of these runs by one bit fails.

The digests were taken on commit 0d6210f (before tasks and components were opened up), so binary
runs are held bit for bit to what fedward computed then. CPU only: Ray's workers run torch on one
thread, so the same seeds give the same bits on any machine of this kind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedward.checkpoint import load_checkpoint

PINNED = {
    # A 3-round EHR run of 0d6210f, uninterrupted; test_simulation resumes one that 0d6210f stopped after round 2.
    "resumed_from_0d6210f": "5a48f7ea823e86f0d8713580f139c651c8145d2972b6ce02337664d881dedc18",
    "fedyogi": "b18c663c328aa584e8f2f1502edc2c2c0a21faa3c36d642ea8a9e86e82ec0f71",
    "scaffold": "bf06b65328a721db6f09e67cca159795491cb0cf1efcb502e33a155df95a131e",
    "fedper": "a3e9aecbc3e6c7e1d6f0fae5dc55d0b4fc70f5054289a95c6f509d147bd782d0",
    "ditto": "5a48f7ea823e86f0d8713580f139c651c8145d2972b6ce02337664d881dedc18",
    "ehr": "781087c11972744546585ff23b753afee5c98cbad941da77266974234621e3af",
    "images": "5a98f546fab43df0ae8ec7eb6eb8d0473bfe179247a99b6c879721c43c883c7f",
}


def assert_pinned(run_dir: Path, name: str) -> None:
    digest = hashlib.sha256(load_checkpoint(run_dir).weights.tobytes()).hexdigest()
    assert PINNED.get(name) == digest, f"final weights of {name!r}: sha256 {digest}, pinned {PINNED.get(name)}"
