"""The run's configuration: typed, validated once, parsed from YAML in one place.

Every section is a frozen keyword-only dataclass that checks itself in `__post_init__` and
raises `ConfigError` naming the field and the fix. `load_config` is the only reader of YAML;
`config_hash` is what makes a run directory refuse a changed configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_type_hints

import yaml

from fedward.errors import ConfigError
from fedward.metrics import BINS

FeatureType = Literal["numeric", "categorical", "boolean"]
NormKind = Literal["batch", "group", "none"]


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


ALL_OTHERS = "all others"  # label.negative_values: every value that is not a positive one


@dataclass(frozen=True, kw_only=True)
class LabelRule:
    """How a label column becomes the task's target.

    Binary tasks: give `positive_values` (values meaning 1, e.g. ["died", "icu"]) together with
    `negative_values` (the values meaning 0, or the text "all others"), or `threshold` (numeric
    values at or above it, inclusive, mean 1), or neither when the column already holds 0/1,
    true/false or yes/no. A value listed nowhere costs its row, never silently becomes a 0.
    Multiclass tasks map the column's values through `task.classes`; regression reads numbers.
    """

    column: str
    positive_values: tuple[str, ...] | None = None
    negative_values: Any = None  # a list of values, or "all others"
    threshold: float | None = None

    def __post_init__(self):
        _need(bool(self.column), "label.column: name the column that holds the outcome")
        _need(
            self.positive_values is None or self.threshold is None,
            f"label ({self.column}): give either positive_values or threshold, not both",
        )
        if self.positive_values is not None:
            object.__setattr__(self, "positive_values", tuple(str(v) for v in self.positive_values))
            _need(len(self.positive_values) > 0, "label.positive_values: list at least one value")
            _need(
                self.negative_values is not None,
                f"label.negative_values ({self.column}): say which values are negative, as a list or as {ALL_OTHERS!r}; "
                f"a value in neither list is then skipped with its value named, never counted as negative",
            )
        if self.negative_values is not None and self.negative_values != ALL_OTHERS:
            _need(
                isinstance(self.negative_values, (list, tuple)) and len(self.negative_values) > 0,
                f"label.negative_values ({self.column}): expected a list of values or {ALL_OTHERS!r}, got {self.negative_values!r}",
            )
            negatives = tuple(str(v) for v in self.negative_values)
            object.__setattr__(self, "negative_values", negatives)
            both = sorted(set(negatives) & set(self.positive_values or ()))
            _need(not both, f"label ({self.column}): {both} are listed as both positive and negative values")
        _need(
            self.negative_values is None or self.positive_values is not None,
            f"label.negative_values ({self.column}): only with positive_values",
        )


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    name: str
    type: FeatureType
    # Codes that mean "not measured" in this column (0, -9, "unknown"): read as missing before
    # anything else sees the value, harmonization included.
    missing_values: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "missing_values", tuple(str(v) for v in self.missing_values))


@dataclass(frozen=True, kw_only=True)
class TableSpec:
    """An EHR export at each hospital: one row per sample, one column per feature."""

    file: str  # relative to the hospital's data folder; .parquet, .csv, .arrow/.feather
    features: tuple[FeatureSpec, ...]
    label: LabelRule
    patient_id: str | None = None  # rows of one patient stay on one side of the split
    # A category seen fewer times at a hospital is reported as "other": a rare value identifies.
    min_category_count: int = 5

    def __post_init__(self):
        _need(bool(self.features), "data.table.features: list the feature columns and their types")
        names = [f.name for f in self.features]
        _need(len(set(names)) == len(names), f"data.table.features: duplicate column in {names}")
        _need(self.label.column not in names, f"data.table: label column {self.label.column!r} is also a feature")
        _need(self.min_category_count >= 1, "data.table.min_category_count: must be at least 1")


@dataclass(frozen=True, kw_only=True)
class DicomSpec:
    """A folder of DICOM files at each hospital plus a table of labels."""

    images: str = "images"  # folder relative to the hospital's data folder, any nesting
    labels: str = "labels.csv"  # CSV, Parquet or Arrow/Feather, relative to the hospital's data folder
    # What the label table is keyed by: the file's SOPInstanceUID, its PatientID, or its path
    # relative to the images folder.
    key: Literal["sop_instance_uid", "patient_id", "path"] = "sop_instance_uid"
    key_column: str = "SOPInstanceUID"
    label: LabelRule
    image_size: int = 64  # images are resized to image_size x image_size
    frames: Literal["all", "first", "middle"] = "middle"  # which frames of a multi-frame file
    # "voi" uses the file's VOI window when present and min-max otherwise; "minmax" always min-max.
    window: Literal["voi", "minmax"] = "voi"

    def __post_init__(self):
        _need(8 <= self.image_size <= 512, f"data.dicom.image_size: expected 8..512, got {self.image_size}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    kind: Literal["table", "dicom"]
    table: TableSpec | None = None
    dicom: DicomSpec | None = None
    holdout_fraction: float = 0.25  # share of patients kept for evaluation, stratified by label
    min_samples: int = 20  # a hospital with fewer usable samples refuses to join

    def __post_init__(self):
        _need(
            (self.kind == "table") == (self.table is not None)
            and (self.kind == "dicom") == (self.dicom is not None),
            f"data: kind is {self.kind!r}, so give exactly the data.{self.kind} section",
        )
        _need(0.0 < self.holdout_fraction < 1.0, "data.holdout_fraction: expected a number in (0, 1)")
        _need(self.min_samples >= 2, "data.min_samples: must be at least 2")


@dataclass(frozen=True, kw_only=True)
class InitWeights:
    """Start the global model from a local safetensors file (nothing is downloaded): every entry of
    the model's state is loaded by name and must match in shape, except those in `keep_initial`
    (a new head, say), which keep the factory's initialization. An entry the file lacks or holds
    beyond the model stops the run before round 1, named."""

    file: str  # relative to the folder the run starts in
    keep_initial: tuple[str, ...] = ()

    def __post_init__(self):
        _need(self.file.endswith(".safetensors"), f"model.init_weights.file: expected a .safetensors file, got {self.file!r}")


TaskKind = Literal["binary", "multiclass", "regression"]


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What the study predicts (fedward/tasks): binary when absent."""

    kind: TaskKind = "binary"
    classes: tuple[str, ...] | None = None  # multiclass: the label values, in the order of the model's outputs
    target: str | None = None  # "package.module:name" of a task of the study's own, built with `args`
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.classes is not None:
            _need(self.kind == "multiclass", f"task.classes: only a multiclass task has classes, task.kind is {self.kind!r}")
            _need(len(self.classes) >= 2, f"task.classes: a multiclass task needs at least two classes, got {list(self.classes)}")
            _need(len(set(self.classes)) == len(self.classes), f"task.classes: duplicate values in {list(self.classes)}")
        _need(self.kind != "multiclass" or self.classes is not None or self.target is not None,
              "task.classes: list the multiclass label values, in the order of the model's outputs")
        _need(self.target is None or ":" in self.target, f"task.target: expected 'package.module:name', got {self.target!r}")
        _need(not self.args or self.target is not None, "task.args: arguments for task.target; name the target too")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # A built-in network (mlp for tables, cnn for images) or `target`, a "package.module:factory"
    # returning any torch.nn.Module, called with input_shape, output_size and `args`.
    kind: Literal["mlp", "cnn"] | None = None
    target: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    init_weights: InitWeights | None = None
    norm: NormKind = "none"  # FedBN needs "batch", DP-SGD needs "group"
    hidden: tuple[int, ...] = (64, 32)  # MLP layer widths
    channels: tuple[int, ...] = (16, 32, 32)  # CNN: one conv block per entry
    dropout: float = 0.0
    groups: int = 4  # GroupNorm groups; must divide every width

    @property
    def widths(self) -> tuple[int, ...]:
        return self.hidden if self.kind != "cnn" else self.channels

    @property
    def name(self) -> str:
        """How messages name the model."""
        return f"model.target {self.target}" if self.target else f"model.kind {self.kind}"

    def narrowed(self, width: float) -> ModelConfig:
        """The nested sub-model keeping the leading `width` share of every layer's units (HeteroFL)."""
        kept = tuple(math.ceil(width * w) for w in self.widths)
        return dataclasses.replace(self, **{"hidden" if self.kind == "mlp" else "channels": kept})

    def __post_init__(self):
        _need((self.kind is None) != (self.target is None), "model: give either kind (mlp or cnn) or target ('package.module:factory'), one of them")
        _need(self.target is None or ":" in self.target, f"model.target: expected 'package.module:factory', got {self.target!r}")
        _need(not self.args or self.target is not None, "model.args: arguments for model.target's factory; name the target too")
        widths = self.widths
        _need(len(widths) > 0 and all(w > 0 for w in widths), f"model: layer widths must be positive, got {widths}")
        _need(0.0 <= self.dropout < 1.0, "model.dropout: expected a number in [0, 1)")
        if self.norm == "group":
            _need(self.groups >= 1, f"model.groups: expected at least 1, got {self.groups}")
            _need(all(w % self.groups == 0 for w in widths), f"model.groups={self.groups} must divide every width {widths}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    # The learning rate over rounds: constant; cosine from lr in round 1 down to lr_min in the last;
    # or step, times lr_gamma every lr_step_rounds rounds.
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    lr_min: float = 0.0
    lr_step_rounds: int = 1
    lr_gamma: float = 0.5
    # Model selection on a validation part of each hospital's training split (its share of the
    # training patients; 0: none), never on the held-out one: the global model of the best round
    # ("best") or of the last ("last"), and training stops after `patience` rounds without a better
    # pooled validation figure (0: never).
    validation_fraction: float = 0.0
    select: Literal["last", "best"] = "last"
    patience: int = 0
    # The forward pass in float32, or under autocast in bfloat16 or float16 (with loss scaling);
    # the weights and what leaves a hospital stay float32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    def __post_init__(self):
        _need(self.local_epochs >= 1, "train.local_epochs: must be at least 1")
        _need(self.batch_size >= 1, "train.batch_size: must be at least 1")
        _need(self.lr > 0, "train.lr: must be positive")
        _need(0 <= self.lr_min < self.lr, f"train.lr_min: expected a number in [0, train.lr={self.lr:g}), got {self.lr_min:g}")
        _need(self.lr_step_rounds >= 1, f"train.lr_step_rounds: expected a whole number >= 1, got {self.lr_step_rounds}")
        _need(0 < self.lr_gamma <= 1, f"train.lr_gamma: expected a number in (0, 1], got {self.lr_gamma:g}")
        _need(0 <= self.validation_fraction < 0.5, f"train.validation_fraction: expected a share in [0, 0.5), got {self.validation_fraction:g}")
        _need(self.patience >= 0, f"train.patience: expected a whole number >= 0, got {self.patience}")
        _need(
            self.validation_fraction > 0 or (self.select == "last" and self.patience == 0),
            "train.select and train.patience choose by validation figures: set train.validation_fraction to keep a validation part "
            "of each training split (the held-out split is never used to choose)",
        )

    def lr_at(self, round: int, rounds: int) -> float:
        """The learning rate of `round` (1-based) in a run of `rounds` rounds."""
        if self.lr_schedule == "cosine":
            done = (round - 1) / max(rounds - 1, 1)
            return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * done)) / 2
        if self.lr_schedule == "step":
            return self.lr * self.lr_gamma ** ((round - 1) // self.lr_step_rounds)
        return self.lr


StrategyName = Literal["fedavg", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold", "fedbn", "fedper", "fedrep", "ditto"]


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """How the round's updates become the next global model; see fedward/strategies."""

    name: StrategyName = "fedavg"
    # A strategy of the study's own, "package.module:Name" (a fedward.strategies.Strategy subclass
    # taking the config), with its settings in `args`; `name` then only says which family it extends.
    target: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    fraction: float = 1.0  # share of available hospitals asked each round
    # FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021): a server optimizer on the mean change.
    server_lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: the smallest denominator of the server's step
    proximal_mu: float = 0.01  # FedProx: weight of the pull toward the global weights in local training
    ditto_lambda: float = 0.1  # Ditto: weight of the pull of each personal model toward the global one
    head_epochs: int = 1  # FedRep: epochs on the personal head, body frozen, before the body's epochs
    # After the last round each hospital fine-tunes the global model on its own training split for
    # this many epochs (0: not at all); that model is its own, evaluated and exported at the hospital.
    fine_tune_epochs: int = 0
    # Each hospital also trains a model on its own data alone, on the run's budget (rounds x local
    # epochs from the same initial weights), so every hospital sees what federating gained it.
    local_only: bool = False

    def __post_init__(self):
        _need(0.0 < self.fraction <= 1.0, "strategy.fraction: expected a number in (0, 1]")
        _need(self.target is None or ":" in self.target, f"strategy.target: expected 'package.module:Name', got {self.target!r}")
        _need(not self.args or self.target is not None, "strategy.args: settings for strategy.target; name the target too")
        _need(self.server_lr > 0, "strategy.server_lr: must be positive")
        _need(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "strategy.beta1, beta2: expected numbers in [0, 1)")
        _need(self.tau > 0, "strategy.tau: must be positive")
        _need(self.proximal_mu >= 0, "strategy.proximal_mu: must be >= 0")
        _need(self.ditto_lambda >= 0, "strategy.ditto_lambda: must be >= 0")
        _need(self.head_epochs >= 1, "strategy.head_epochs: must be at least 1")
        _need(self.fine_tune_epochs >= 0, "strategy.fine_tune_epochs: must be >= 0")


RAY_RESERVED = frozenset({"CPU", "GPU", "TPU", "memory", "object_store_memory", "accelerator_type"})
# What may differ per hospital: dropout leaves the layout unchanged; `width` (HeteroFL) gives the
# hospital a narrower model nested in the global one. Other differences would not share weights.
PER_HOSPITAL_MODEL_OPTIONS = frozenset({"dropout", "width"})


# Largest total coefficient-modulus bits per CKKS ring degree for 128-bit security (HE standard).
CKKS_MAX_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    """Secure aggregation by pairwise masking (Bonawitz et al. 2017): the driver sees only sums."""

    enabled: bool = False
    # Each coordinate of an update (a change of a weight) is clipped to [-clip, clip] and encoded
    # in fixed point with `fraction_bits` bits after the point, in a ring of 2**ring_bits.
    clip: float = 8.0
    fraction_bits: int = 20
    ring_bits: Literal[32, 64] = 32
    # Hospitals that may drop out after sharing their keys while the others' sum is still recovered;
    # the reconstruction threshold is (hospitals in the round) - dropout_tolerance.
    dropout_tolerance: int = 1

    def __post_init__(self):
        _need(self.clip > 0, "privacy.masking.clip: must be positive")
        _need(self.fraction_bits >= 8, "privacy.masking.fraction_bits: expected at least 8")
        _need(
            self.clip * 2.0**self.fraction_bits < 2.0 ** (self.ring_bits - 2),
            f"privacy.masking: clip={self.clip} with fraction_bits={self.fraction_bits} overflows a "
            f"{self.ring_bits}-bit ring; lower one of them or use ring_bits: 64",
        )
        _need(self.dropout_tolerance >= 0, "privacy.masking.dropout_tolerance: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class EncryptionConfig:
    """Homomorphic encryption (CKKS, TenSEAL): the driver adds ciphertexts it cannot read."""

    enabled: bool = False
    poly_modulus_degree: Literal[4096, 8192, 16384, 32768] = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40
    layers: tuple[str, ...] | None = None  # state-dict entries to encrypt; None: all of them
    # An exact CKKS decryption leaks about the secret key: the aggregate is rounded to this many
    # decimals by the decrypting hospital before it leaves.
    release_decimals: int = 6

    def __post_init__(self):
        bits, limit = sum(self.coeff_mod_bit_sizes), CKKS_MAX_BITS_128[self.poly_modulus_degree]
        _need(len(self.coeff_mod_bit_sizes) >= 2, "privacy.encryption.coeff_mod_bit_sizes: list at least two primes")
        _need(
            bits <= limit,
            f"privacy.encryption: coeff_mod_bit_sizes sum to {bits} bits, above the {limit} that degree "
            f"{self.poly_modulus_degree} allows for 128-bit security",
        )
        _need(20 <= self.scale_bits < min(self.coeff_mod_bit_sizes[:-1]) + 1, "privacy.encryption.scale_bits: expected 20 up to the middle primes' size")
        _need(1 <= self.release_decimals <= 8, "privacy.encryption.release_decimals: expected 1..8")
        _need(self.layers is None or len(self.layers) > 0, "privacy.encryption.layers: list at least one entry, or leave it out for all")


@dataclass(frozen=True, kw_only=True)
class DpSgdConfig:
    """Patient-level differential privacy: DP-SGD (Opacus) inside each hospital."""

    enabled: bool = False
    epsilon: float | None = None  # each hospital's budget over the run; training stops before exceeding it
    delta: float = 1e-5
    noise_multiplier: float | None = None  # None: calibrated so run.rounds rounds spend exactly epsilon
    max_grad_norm: float = 1.0
    # "patient": a patient's samples are sampled and clipped together; "sample": each row or image
    # is a unit, and the guarantee (said so in the ledger) is per sample only.
    unit: Literal["patient", "sample"] = "patient"

    def __post_init__(self):
        _check_dp(self, "dp_sgd")
        _need(self.max_grad_norm > 0, "privacy.dp_sgd.max_grad_norm: must be positive")


@dataclass(frozen=True, kw_only=True)
class DpFedAvgConfig:
    """Hospital-level differential privacy: each update clipped, Gaussian noise on the sum."""

    enabled: bool = False
    epsilon: float | None = None  # budget over the run for any one hospital's participation
    delta: float = 1e-5
    noise_multiplier: float | None = None  # None: calibrated so run.rounds rounds spend exactly epsilon
    clip_norm: float = 1.0  # L2 norm bound of each hospital's update

    def __post_init__(self):
        _check_dp(self, "dp_fedavg")
        _need(self.clip_norm > 0, "privacy.dp_fedavg.clip_norm: must be positive")


def _check_dp(section: DpSgdConfig | DpFedAvgConfig, name: str) -> None:
    _need(0 < section.delta < 1, f"privacy.{name}.delta: expected a number in (0, 1)")
    _need(section.epsilon is None or section.epsilon > 0, f"privacy.{name}.epsilon: must be positive")
    _need(
        section.noise_multiplier is None or section.noise_multiplier > 0,
        f"privacy.{name}.noise_multiplier: must be positive",
    )
    _need(
        not section.enabled or section.epsilon is not None or section.noise_multiplier is not None,
        f"privacy.{name}: give epsilon (a budget), noise_multiplier, or both",
    )


@dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """How a plaintext update's change travels: as it is, as 8-bit codes (unbiased stochastic
    rounding, one scale per block), or only its largest entries, the rest carried to the hospital's
    next update (error feedback)."""

    kind: Literal["none", "int8", "top_k"] = "none"
    block: int = 256  # int8: entries sharing one scale
    top_k_fraction: float = 0.01  # top_k: the share of entries sent each round

    def __post_init__(self):
        _need(self.block >= 1, f"compression.block: expected a whole number >= 1, got {self.block}")
        _need(0 < self.top_k_fraction <= 1, f"compression.top_k_fraction: expected a number in (0, 1], got {self.top_k_fraction}")


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """What protects updates on their way out of the hospitals; see privacy/."""

    masking: MaskingConfig = MaskingConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    dp_sgd: DpSgdConfig = DpSgdConfig()
    dp_fedavg: DpFedAvgConfig = DpFedAvgConfig()

    def __post_init__(self):
        _need(
            not (self.masking.enabled and self.encryption.enabled),
            "privacy: masking and encryption both hide individual updates from the driver; enable one of them",
        )


@dataclass(frozen=True, kw_only=True)
class ExplainConfig:
    """SHAP explanations of the global model, computed inside each hospital after the last round."""

    enabled: bool = True
    background: int = 100  # background samples, drawn from the hospital's own held-out split
    max_samples: int = 300  # held-out samples explained per hospital (all of them when fewer)
    bins: int = 8  # numeric features: bins at quantiles of the pooled distribution
    min_bin_count: int = 10  # bins with fewer patients are suppressed: a small bin identifies
    noise_sigma: float = 0.0  # Gaussian noise on every released mean (0: none)
    patients: int = 3  # patients per hospital shown in the hospital's own report
    image_grid: int = 8  # images: the attribution map leaves the hospital as a grid x grid mean
    # Demo data only: its truth.json, naming the features that drive the outcome and those that are
    # pure noise, so the report can check that the explanation ranks them as they truly are.
    truth: str | None = None

    def __post_init__(self):
        _need(self.background >= 1, "explain.background: must be at least 1")
        _need(self.max_samples >= 1, "explain.max_samples: must be at least 1")
        _need(self.bins >= 2, "explain.bins: must be at least 2")
        _need(self.min_bin_count >= 1, "explain.min_bin_count: must be at least 1")
        _need(self.noise_sigma >= 0, "explain.noise_sigma: must be >= 0")
        _need(self.patients >= 0, "explain.patients: must be >= 0")
        _need(self.image_grid >= 1, "explain.image_grid: must be at least 1")


@dataclass(frozen=True, kw_only=True)
class RobustConfig:
    """How the hospitals' changes combine when some may be faulty or hostile (fedward/aggregation.py)."""

    rule: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "fltrust"] = "mean"
    trim: float = 0.2  # trimmed_mean: the share of values cut at each end of every coordinate
    byzantine: int = 1  # krum, multi_krum: hospitals per round that may be hostile (f)
    keep: int | None = None  # multi_krum: changes kept and averaged (default: hospitals in the round - byzantine)
    norm_bound: float | None = None  # every change is clipped to this L2 norm before combining
    trusted_data: str | None = None  # fltrust: the driver's own small, clean data set, in a hospital's format
    # A hospital whose change lies more than `flag_distance` times the round's median distance from
    # the median change is flagged; flagged in `quarantine_after` rounds, it is asked no more (0: never).
    flag_distance: float = 3.0
    quarantine_after: int = 0

    def __post_init__(self):
        _need(0 < self.trim < 0.5, f"robust.trim: expected a share in (0, 0.5), got {self.trim}")
        _need(self.byzantine >= 0, f"robust.byzantine: must be >= 0, got {self.byzantine}")
        _need(self.keep is None or self.keep >= 1, f"robust.keep: must be at least 1, got {self.keep}")
        _need(self.norm_bound is None or self.norm_bound > 0, f"robust.norm_bound: must be positive, got {self.norm_bound}")
        _need(self.flag_distance > 1, f"robust.flag_distance: must be above 1, got {self.flag_distance}")
        _need(self.quarantine_after >= 0, f"robust.quarantine_after: must be >= 0, got {self.quarantine_after}")


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """A simulated attack or fault for testing defences (actors/attacks.py): what the named hospitals do."""

    hospitals: tuple[str, ...] = ()
    kind: Literal["label_flip", "sign_flip", "scale", "noise", "slow"] = "sign_flip"
    scale: float = 10.0  # scale: the factor on the change (model replacement)
    sigma: float = 1.0  # noise: the standard deviation of the noise sent instead of a change
    delay_s: float = 10.0  # slow: seconds each update takes longer, a straggler's

    def __post_init__(self):
        _need(self.sigma > 0, f"attack.sigma: must be positive, got {self.sigma}")
        _need(self.delay_s >= 0, f"attack.delay_s: must be >= 0, got {self.delay_s}")


@dataclass(frozen=True, kw_only=True)
class SubgroupConfig:
    """Performance per patient group of the final global model, computed inside each hospital."""

    sex: str | None = None  # the column (tables) or DICOM keyword (images) holding the patient's sex
    age: str | None = None  # the same for age in years; DICOM age strings such as 045Y are read as years
    age_bands: tuple[float, ...] = (40.0, 65.0)  # band edges: under 40, 40 to under 65, 65 and over
    threshold: float = 0.5  # a score at or above it counts as a positive prediction
    min_count: int = 10  # a group is released only with at least this many positives and negatives

    @property
    def attributes(self) -> dict[str, str]:
        """The configured group attributes: name -> column or DICOM keyword."""
        return {name: where for name, where in (("sex", self.sex), ("age", self.age)) if where}

    def __post_init__(self):
        _need(
            len(self.age_bands) > 0 and all(b > a for a, b in zip(self.age_bands, self.age_bands[1:])) and all(b > 0 for b in self.age_bands),
            f"subgroups.age_bands: expected increasing positive ages, got {list(self.age_bands)}",
        )
        # Sensitivity and specificity come from the score histograms, exact only at a bin edge.
        _need(
            0 < self.threshold < 1 and abs(self.threshold * BINS - round(self.threshold * BINS)) < 1e-9,
            f"subgroups.threshold: expected a multiple of {1 / BINS:g} in (0, 1), got {self.threshold}",
        )
        _need(self.min_count >= 1, "subgroups.min_count: must be at least 1")


# On a cluster the shared config names no hospital's paths: each hospital machine starts its Ray
# node with this variable, and the hospital's data is the folder named after it under that root.
# An actor placed on another hospital's node would find no data there, rather than the wrong data.
DATA_ROOT_ENV = "FEDWARD_DATA_ROOT"


@dataclass(frozen=True, kw_only=True)
class HospitalConfig:
    name: str
    # The hospital's data folder, as seen on the node the hospital runs on; none: NAME under the
    # folder its node's FEDWARD_DATA_ROOT names.
    data: str | None = None
    work_dir: str | None = None  # its own area for caches, reports, state; default DATA/.fedward
    cpus: float = 0.5
    gpus: float = 0  # GPUs it asks Ray for: it trains on one, hosted in its own process (docs/gpus.md)
    model: dict[str, Any] = field(default_factory=dict)  # per-hospital model options
    address: str | None = None  # run.hosting cross_site: its service's host:port (fedward serve)

    def __post_init__(self):
        _need(
            bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
            f"hospitals: name {self.name!r} must be letters, digits, '-' or '_' (it is a Ray resource)",
        )
        _need(self.name not in RAY_RESERVED, f"hospitals: name {self.name!r} is one of Ray's own resources; choose another")
        unknown = sorted(set(self.model) - PER_HOSPITAL_MODEL_OPTIONS)
        _need(
            not unknown,
            f"hospitals.{self.name}.model: {unknown} cannot differ per hospital (the shared weights would not fit); "
            f"per-hospital options are {sorted(PER_HOSPITAL_MODEL_OPTIONS)}",
        )
        _need(self.cpus >= 0, f"hospitals.{self.name}.cpus: must be >= 0")
        _need(math.isfinite(self.gpus) and self.gpus >= 0, f"hospitals.{self.name}.gpus: expected a number of GPUs, 0 or more")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str
    root: str = "runs"  # the run directory is ROOT/NAME; cluster jobs want an absolute root
    seed: int = 0
    rounds: int = 5
    min_hospitals: int = 2  # quorum: a round with fewer successful hospitals fails
    round_timeout_s: float = 900.0  # a hospital silent for longer is left out of the round
    data_timeout_s: float = 3600.0  # the first read of a hospital's data (DICOM decoding) may be long
    # A round whose aggregation fails (secure aggregation could not recover the sum) is tried again
    # this many times; then the run stops, resumable from the last checkpoint.
    round_retries: int = 2
    hospital_restarts: int = 3  # times Ray restarts a hospital's process that died; it then rejoins
    quorum_wait_s: float = 30.0  # pause before a round short of its quorum is tried again
    min_free_mb: float = 64.0  # a round starts only with this much free space for its checkpoint and records
    # An update that misses its round's deadline is dropped (0), or counts in the round it arrives
    # in, its weight times stale_weight per round late.
    stale_weight: float = 0.0
    # How the simulation runs its hospitals: on a pool of shared worker processes ("auto" and
    # "pool"), each in its own process as on a cluster ("per_hospital"), or all in the driver's
    # process ("in_process", for debugging). On a cluster "auto" means per_hospital: a hospital
    # runs on the node holding its data. "cross_site": each hospital is its own service in its own
    # trust domain (`fedward serve`), reached at hospitals[].address under the driver's `identity`.
    hosting: Literal["auto", "pool", "per_hospital", "in_process", "cross_site"] = "auto"
    identity: str | None = None  # cross_site: the driver's folder of NAME.key, NAME.crt, ca.crt, crl.pem
    identity_name: str = "driver"  # cross_site: the name the driver's certificate vouches for
    workers: int | None = None  # the pool's worker processes; default one per CPU
    resident_hospitals: int = 64  # hospitals a pool worker keeps in memory; the others wait on disk
    # Where a study's own components (model.target, task.target) are imported from besides installed
    # packages: the folder the run was started in, unless given.
    study_dir: str | None = None

    def __post_init__(self):
        _need(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            f"run.name: expected a folder name, got {self.name!r}",
        )
        _need(self.seed >= 0, f"run.seed: expected a whole number >= 0, got {self.seed}")
        _need(self.rounds >= 1, "run.rounds: must be at least 1")
        _need(self.min_hospitals >= 1, "run.min_hospitals: must be at least 1")
        _need(self.round_timeout_s > 0, "run.round_timeout_s: must be positive")
        _need(self.data_timeout_s > 0, "run.data_timeout_s: must be positive")
        _need(self.round_retries >= 0, "run.round_retries: must be >= 0")
        _need(self.hospital_restarts >= 0, "run.hospital_restarts: must be >= 0")
        _need(self.quorum_wait_s >= 0, "run.quorum_wait_s: must be >= 0")
        _need(self.min_free_mb >= 0, "run.min_free_mb: must be >= 0")
        _need(0 <= self.stale_weight <= 1, f"run.stale_weight: expected a number in [0, 1], got {self.stale_weight}")
        _need(self.workers is None or self.workers >= 1, f"run.workers: expected a whole number >= 1, got {self.workers}")
        _need(self.resident_hospitals >= 1, f"run.resident_hospitals: expected a whole number >= 1, got {self.resident_hospitals}")


@dataclass(frozen=True, kw_only=True)
class FedwardConfig:
    run: RunConfig
    data: DataConfig
    model: ModelConfig
    hospitals: tuple[HospitalConfig, ...]
    task: TaskConfig = TaskConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    compression: CompressionConfig = CompressionConfig()
    explain: ExplainConfig = ExplainConfig()
    subgroups: SubgroupConfig = SubgroupConfig()
    robust: RobustConfig = RobustConfig()
    attack: AttackConfig = AttackConfig()

    def __post_init__(self):
        names = [h.name for h in self.hospitals]
        _need(len(names) > 0, "hospitals: list at least one hospital")
        _need(len(set(names)) == len(names), f"hospitals: duplicate names in {names}")
        _need(
            self.run.min_hospitals <= len(names),
            f"run.min_hospitals={self.run.min_hospitals} but only {len(names)} hospitals are listed",
        )
        with_gpus = [h.name for h in self.hospitals if h.gpus > 0]
        _need(
            not with_gpus or self.run.hosting != "pool",
            f"hospitals: {with_gpus} ask for GPUs; run.hosting pool cannot grant them (the shared worker pool has none): "
            "use run.hosting auto or per_hospital",
        )
        _need(
            self.train.precision == "fp32" or not self.privacy.dp_sgd.enabled,
            f"train.precision: {self.train.precision} with privacy.dp_sgd: per-sample clipping and the accountant are shown to hold in "
            "float32 only; use train.precision: fp32",
        )
        if self.run.hosting == "cross_site":
            _need(self.run.identity is not None, "run.identity: run.hosting cross_site needs the driver's identity folder (fedward request)")
            missing = [h.name for h in self.hospitals if not h.address]
            _need(not missing, f"hospitals: {missing} have no address; run.hosting cross_site reaches each hospital's service at its host:port")
        expected = {"table": "mlp", "dicom": "cnn"}[self.data.kind]
        _need(
            self.model.kind in (None, expected),
            f"model.kind: {self.model.kind!r} cannot read data.kind {self.data.kind!r}; use {expected!r}",
        )
        self._check_task()
        for h in self.hospitals:
            self.model_for(h.name)  # validates each hospital's overrides now, not mid-run
        unknown = sorted(set(self.attack.hospitals) - set(names))
        _need(not unknown, f"attack.hospitals: {unknown} are not hospitals of this run; hospitals are {names}")
        _need(
            self.strategy.name != "fedbn" or self.model.norm == "batch",
            f"strategy.name: fedbn keeps BatchNorm layers at each hospital, but model.norm is {self.model.norm!r}; set it to 'batch'",
        )
        if self.data.kind == "dicom":
            from pydicom.datadict import tag_for_keyword  # only image runs need the dictionary

            for name, keyword in self.subgroups.attributes.items():
                _need(
                    tag_for_keyword(keyword) is not None,
                    f"subgroups.{name}: {keyword!r} is not a DICOM keyword; expected one such as PatientSex or PatientAge",
                )
        # Which settings combine is decided by the components' declarations (pipelines/compatibility.py);
        # here only each setting's own values are checked.
        privacy = self.privacy
        asked = self.fewest_asked  # thresholds must hold for the smallest round too
        self._check_robust()
        if privacy.masking.enabled:
            threshold = asked - privacy.masking.dropout_tolerance
            _need(
                threshold >= 2 and threshold > asked / 2,
                f"privacy.masking.dropout_tolerance={privacy.masking.dropout_tolerance}: with {asked} hospitals in a round "
                f"the reconstruction threshold would be {threshold}; it must be at least 2 and more than half of them",
            )
        _need(
            not (privacy.dp_sgd.enabled and privacy.dp_sgd.unit == "patient" and self.data.kind == "table" and self.data.table.patient_id is None),
            "privacy.dp_sgd.unit: patient protects all of a patient's rows together, but data.table.patient_id is not set, so each row "
            "would count as a patient of its own; name the patient id column, or set unit: sample (which protects rows, not patients)",
        )
        if privacy.dp_fedavg.enabled:
            _need(
                not privacy.masking.enabled or privacy.dp_fedavg.clip_norm <= privacy.masking.clip,
                f"privacy: dp_fedavg.clip_norm={privacy.dp_fedavg.clip_norm} must not exceed masking.clip={privacy.masking.clip}, "
                f"so no clipped update needs clipping again",
            )

    def _check_task(self) -> None:
        task, rule = self.task, self.label
        if task.target is None and task.kind != "binary":
            _need(
                rule.positive_values is None and rule.threshold is None,
                f"data.{self.data.kind}.label: positive_values and threshold make a binary outcome, but task.kind is {task.kind}; "
                f"{'its classes come from task.classes' if task.kind == 'multiclass' else 'its target is the column read as a number'}",
            )

    @property
    def fewest_asked(self) -> int:
        """The fewest hospitals a round asks: strategy.fraction of them, never below run.min_hospitals."""
        names = len(self.hospitals)
        return min(names, max(self.run.min_hospitals, math.ceil(self.strategy.fraction * names)))

    @property
    def label(self) -> LabelRule:
        return self.data.table.label if self.data.kind == "table" else self.data.dicom.label

    def _check_robust(self) -> None:
        rule, robust = self.robust.rule, self.robust
        _need(
            (rule == "fltrust") == (robust.trusted_data is not None),
            "robust.trusted_data: fltrust needs the driver's trusted data folder (and only fltrust uses one)",
        )
        _need(
            robust.norm_bound is None or not self.privacy.dp_fedavg.enabled,
            "robust.norm_bound: privacy.dp_fedavg already bounds each update, by its clip_norm",
        )
        # A round may go ahead with as few as run.min_hospitals changes: the rule must hold for them.
        fewest = self.run.min_hospitals
        if rule in ("krum", "multi_krum"):
            _need(
                fewest > 2 * robust.byzantine + 2,
                f"robust.byzantine={robust.byzantine}: Krum needs more than 2f + 2 = {2 * robust.byzantine + 2} hospitals per round, "
                f"and a round may go ahead with run.min_hospitals={fewest}",
            )
        if rule == "trimmed_mean":
            _need(
                int(robust.trim * fewest) >= 1,
                f"robust.trim={robust.trim}: a round with run.min_hospitals={fewest} hospitals would cut nothing; "
                f"raise it to at least {math.ceil(100 / fewest) / 100:.2f} (below 0.5)",
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root).expanduser().absolute() / self.run.name

    def hospital(self, name: str) -> HospitalConfig:
        for h in self.hospitals:
            if h.name == name:
                return h
        raise ConfigError(f"no hospital named {name!r}; known: {[h.name for h in self.hospitals]}")

    def with_paths_from(self, base: Path) -> FedwardConfig:
        """The config with hospitals' relative paths made absolute against `base`.

        The driver resolves them against the folder it was started in before sending the config to
        hospital actors, whose own working folder on a Ray node is not the user's.
        """

        def absolute(path: str | None) -> str | None:
            return None if path is None else str((base / Path(path).expanduser()).absolute())

        hospitals = tuple(dataclasses.replace(h, data=absolute(h.data), work_dir=absolute(h.work_dir)) for h in self.hospitals)
        run = dataclasses.replace(self.run, study_dir=absolute(self.run.study_dir or "."))
        return dataclasses.replace(self, hospitals=hospitals, run=run)

    def model_for(self, hospital: str) -> ModelConfig:
        overrides = dict(self.hospital(hospital).model)
        _need(
            "init_weights" not in overrides,
            f"hospitals.{hospital}.model.init_weights: the global model starts from one file for every hospital; set model.init_weights",
        )
        _need(
            not overrides or self.model.target is None,
            f"hospitals.{hospital}.model: {sorted(overrides)} are options of the built-in networks; {self.model.name} takes its own model.args",
        )
        width = overrides.pop("width", 1.0)
        _need(
            isinstance(width, (int, float)) and not isinstance(width, bool) and 0 < width <= 1,
            f"hospitals.{hospital}.model.width: expected a share of the global model's width in (0, 1], got {width!r}",
        )
        _need(
            width == 1 or self.model.target is None,
            f"hospitals.{hospital}.model.width: a narrower model is defined for the built-in networks; {self.model.name} has its own layers",
        )
        _need(
            width == 1 or self.model.norm != "group",
            f"hospitals.{hospital}.model.width: GroupNorm normalizes over groups of channels that change with the width, so a "
            f"narrower model would not compute a part of the global one; use model.norm 'batch' or 'none'",
        )
        try:
            own = dataclasses.replace(self.model, **_parse_fields(ModelConfig, overrides, f"hospitals.{hospital}.model", partial=True))
        except TypeError as e:
            raise ConfigError(f"hospitals.{hospital}.model: {e}") from None
        own = own.narrowed(width) if width < 1 else own
        _need(
            (own.dropout > 0) == (self.model.dropout > 0),
            f"hospitals.{hospital}.model.dropout: a dropout layer only where model.dropout is 0 (or none where it is not) "
            f"shifts the layers' names; give model.dropout a non-zero value and vary it per hospital",
        )
        return own


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    args = get_args(hint)
    if hint is Any:
        return value
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return _coerce(value, rest[0] if len(rest) == 1 else rest, where)
    if origin is Literal:
        _need(value in args, f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        _need(isinstance(value, dict), f"{where}: expected a mapping, got {type(value).__name__}")
        return hint(**_parse_fields(hint, value, where))
    if origin is tuple:
        _need(isinstance(value, (list, tuple)), f"{where}: expected a list, got {value!r}")
        # An entry with a name (a feature, a hospital) is named by it in messages, never by its position.
        return tuple(_coerce(v, args[0], f"{where}.{v['name']}" if isinstance(v, dict) and isinstance(v.get("name"), str) else f"{where}[{i}]")
                     for i, v in enumerate(value))
    if origin is dict:
        _need(isinstance(value, dict), f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        _need(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is str:
        _need(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{where}: expected text, got {value!r}")
        return str(value)
    if hint is bool:
        _need(isinstance(value, bool), f"{where}: expected true or false, got {value!r}")
        return value
    raise ConfigError(f"{where}: cannot read a value of type {hint}")


def _parse_fields(cls: type, raw: dict, where: str, partial: bool = False) -> dict:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(raw) - known)
    _need(not unknown, f"{where or 'top level'}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    if not partial:
        required = {f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(raw))
        _need(not missing, f"{where or 'top level'}: missing field(s) {missing}")
    return {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}


def _features(raw: Any) -> list[dict]:
    # A mapping `name: type` (or `name: {type: ..., missing_values: [...]}`) reads better in YAML
    # than a list of records; accept both.
    if isinstance(raw, dict):
        return [{"name": k, **v} if isinstance(v, dict) else {"name": k, "type": v} for k, v in raw.items()]
    return raw


def parse_config(raw: dict, source: str = "config") -> FedwardConfig:
    _need(isinstance(raw, dict), f"{source}: expected a mapping at the top level")
    raw = json.loads(json.dumps(raw))  # a private copy we may normalise
    table = raw.get("data", {}).get("table") if isinstance(raw.get("data"), dict) else None
    if isinstance(table, dict) and "features" in table:
        table["features"] = _features(table["features"])
    try:
        return FedwardConfig(**_parse_fields(FedwardConfig, raw, ""))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> FedwardConfig:
    """Read a YAML config; `overrides` are `section.field=value` settings applied on top, the
    value read as YAML (`privacy.masking.enabled=true`, `train.lr=0.01`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
        for setting in overrides:
            _override(raw, setting)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(raw, str(path) + (f" with {', '.join(overrides)}" if overrides else ""))


def _override(raw: Any, setting: str) -> None:
    key, sep, value = setting.partition("=")
    _need(bool(sep) and bool(key), f"--set {setting!r}: expected section.field=value")
    *sections, name = key.split(".")
    node = raw
    for i, section in enumerate(sections):
        if isinstance(node, list):  # a list of named entries (hospitals): pick one by its name
            named = [entry for entry in node if isinstance(entry, dict) and entry.get("name") == section]
            _need(len(named) == 1, f"--set {setting!r}: {'.'.join(sections[:i])} has no entry named {section!r}")
            node = named[0]
            continue
        _need(isinstance(node, dict), f"--set {setting!r}: {'.'.join(sections[:i])} is not a section")
        node = node.setdefault(section, {})
    _need(isinstance(node, dict), f"--set {setting!r}: {'.'.join(sections)} is not a section")
    node[name] = yaml.safe_load(value)


def config_to_dict(config: FedwardConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


# Where things run and how long to wait do not change what a run computes, so they may change
# between a run and its resume: a stuck run can be given a longer timeout, data can move (its
# content is checked by fingerprint instead).
OPERATIONAL = {
    "run": ("root", "round_timeout_s", "data_timeout_s", "round_retries", "hospital_restarts", "quorum_wait_s", "min_free_mb",
            "hosting", "workers", "resident_hospitals", "study_dir", "identity", "identity_name"),
    "hospitals": ("data", "work_dir", "cpus", "gpus", "address"),
}


def config_identity(config: FedwardConfig) -> dict:
    """The part of the config that decides the run's result. Subgroup evaluation reads the final
    model without changing it, so it can be added to a finished run."""
    body = config_to_dict(config)
    body.pop("subgroups")
    # Settings added later stay out at their defaults, so runs made before them keep their identity.
    if config.compression == CompressionConfig():
        body.pop("compression")
    if config.task == TaskConfig():
        body.pop("task")
    for key in ("target", "args"):
        if not body["strategy"][key]:
            body["strategy"].pop(key)
    for key in ("target", "args", "init_weights"):
        if not body["model"][key]:
            body["model"].pop(key)
    defaults = dataclasses.asdict(TrainConfig())
    for key in ("lr_schedule", "lr_min", "lr_step_rounds", "lr_gamma", "validation_fraction", "select", "patience", "precision"):
        if body["train"][key] == defaults[key]:
            body["train"].pop(key)
    data = body["data"]
    label = (data["table"] or data["dicom"])["label"]
    if label["negative_values"] in (None, ALL_OTHERS):  # what every positive_values rule meant before it could be said
        label.pop("negative_values")
    for feature in (data["table"] or {}).get("features", ()):
        if not feature["missing_values"]:
            feature.pop("missing_values")
    for key in OPERATIONAL["run"]:
        body["run"].pop(key)
    for hospital in body["hospitals"]:
        for key in OPERATIONAL["hospitals"]:
            hospital.pop(key)
    return body


def config_hash(config: FedwardConfig) -> str:
    canonical = json.dumps(config_identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable list of what changed between two config dicts, for refusing a resume."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        where = f"{prefix}{key}" if isinstance(key, str) else f"{prefix.rstrip('.')}[{key}]"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            a, b = dict(enumerate(a)), dict(enumerate(b))
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, where + "."))
        elif a != b:
            out.append(f"{where}: {a!r} -> {b!r}")
    return out
