"""What travels between the driver and the hospitals: small frozen dataclasses.

Only numpy buffers and scalars cross a process boundary; never torch modules, adapters, Ray
handles or patient rows. Weights travel as one flat float32 buffer plus its `Layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np

from fedward.pooling import PaddedStatistics
from fedward.release import ScoreBins


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the tensors packed, in order, into a flat float32 buffer."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return sum(prod(s) for s in self.shapes)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            out[name] = slice(start, start + prod(shape))
            start += prod(shape)
        return out


@dataclass(frozen=True)
class RoundPlan:
    """What the driver asks of one hospital in one round."""

    round: int
    hospital: str
    seed: int  # the hospital's training randomness for this round, derived from the run seed
    local_epochs: int
    lr: float


@dataclass(frozen=True)
class Update:
    """What a hospital's training changed in the global weights: a change, never data.

    `delta` is the hospital's weights minus the global weights it started the round from. `weight`
    is its share in the aggregate: its example count, or 1 under hospital-level DP, where every
    hospital counts once so that one hospital's influence is bounded.
    """

    round: int
    hospital: str
    delta: np.ndarray  # flat float32, laid out by `layout`
    layout: Layout
    num_examples: int
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CompressedDelta:
    """A change compressed for the wire (see fedward/compression.py): `size` float32 values as
    int8 `codes` times one float32 scale per `block` entries (int8) or zeros (top_k), with the
    `values` at ascending `indices` sent exactly (top_k's chosen entries, running statistics)."""

    kind: str  # "int8" or "top_k"
    size: int
    block: int = 0
    codes: np.ndarray | None = None  # int8
    scales: np.ndarray | None = None  # float32, one per block
    indices: np.ndarray | None = None  # uint32, ascending
    values: np.ndarray | None = None  # float32


@dataclass(frozen=True)
class CompressedUpdate:
    """An `Update` whose change travels compressed; the driver restores it before anything reads it."""

    round: int
    hospital: str
    delta: CompressedDelta
    layout: Layout
    num_examples: int
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SealedUpdate:
    """An update in the form a privacy hook lets it leave the hospital: the driver can combine
    sealed updates but not read one. Counts and training metrics travel in the clear."""

    round: int
    hospital: str
    form: str  # "masked" or "encrypted"
    payload: Any  # the hook's own: masked ring elements, serialized ciphertexts
    layout: Layout
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """What a hospital releases of a model on its held-out split.

    Per-patient outputs stay at the hospital. In the clear (fedward/release.py): `statistics`,
    cells each counting at least its release floor in patients, and `figures` computed from them
    alone, named by the task (auroc, macro_auroc, r2, ...; NaN where undefined); a hospital with
    too few patients to fill a cell releases neither and says why in `held_back`. `padded` holds
    its exact statistics under the pad of the hospitals' evaluation key (fedward/pooling.py): the
    driver adds them up and a hospital turns the sum into the pooled figures.
    """

    round: int
    hospital: str
    num_examples: int
    figures: dict[str, Any]
    statistics: dict[str, np.ndarray]
    padded: PaddedStatistics | None
    held_back: str | None = None


@dataclass(frozen=True)
class GroupBins:
    """A hospital's held-out score bins per patient group (fedward/release.py), for the groups it may release."""

    hospital: str
    groups: dict[str, dict[str, ScoreBins]]  # attribute -> group -> its bins
    aurocs: dict[str, dict[str, float]]  # attribute -> group -> its AUROC, to two decimals
    padded: dict[str, dict[str, PaddedStatistics]]  # attribute -> group -> its exact histograms, padded (fedward/pooling.py)
    held_back: dict[str, bool]  # attribute -> whether any group stayed at the hospital (how many would say too much)


def fingerprint_scheme(fingerprint: str) -> str:
    """How a data fingerprint was made: its "scheme:" prefix, or sha256 for one without (tables,
    and images before their content hashes were BLAKE3)."""
    return fingerprint.split(":", 1)[0] if ":" in fingerprint else "sha256"


@dataclass(frozen=True)
class DataCounts:
    """How a hospital's data went: usable samples and skipped ones per reason, no identifiers."""

    hospital: str
    train_examples: int
    holdout_examples: int
    train_patients: int
    holdout_patients: int
    # Samples per class value (binary: "0" and "1"; empty for a numeric target) and skipped inputs
    # per reason; a count under the hospital's release floor is held back ("fewer than 10").
    targets: dict[str, int | str]
    skipped: dict[str, int | str]
    fingerprint: str  # hash of the content hashes of the usable inputs, for the audit manifest
    split_fingerprint: str  # hash of the held-out sample ids: shows the split, reveals no sample
    validation_examples: int = 0  # the training split's part kept for model selection (train.validation_fraction)

    @property
    def fingerprints(self) -> dict[str, str]:
        """What must not change for a run to go on with this data: its content and its split."""
        return {"fingerprint": self.fingerprint, "split_fingerprint": self.split_fingerprint}


@dataclass(frozen=True)
class Placement:
    """Where a hospital's actor runs, and what keeps it from its data there (None: nothing)."""

    hospital: str
    node_id: str
    node_ip: str
    problem: str | None


@dataclass(frozen=True)
class Failure:
    """A call that failed at a hospital hosted in the driver's process, as the driver may learn of it."""

    reason: str
