"""The model the consortium trains, as the driver builds and checks it before round 1.

The driver builds the global model from the config (a built-in network or the study's factory) to
check it against the task, the privacy settings and the explainer, to draw its first weights (the
run's seed, or `model.init_weights`), and to know the layout every hospital's update is held to.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedward.config import FedwardConfig
from fedward.errors import ConfigError
from fedward.models.flat import flatten
from fedward.models.initial import load_initial_weights
from fedward.models.networks import build_model
from fedward.pipelines.manifest import record_initial_weights
from fedward.privacy import dp_fedavg, dp_sgd
from fedward.strategies import Strategy
from fedward.tasks import Task
from fedward.types import Layout


class GlobalModel:
    def __init__(self, config: FedwardConfig, task: Task, strategy: Strategy, *, study_dir: str | None, started_in: Path, run_dir: Path):
        self.config, self.task, self.strategy = config, task, strategy
        self.study_dir, self.started_in, self.run_dir = study_dir, started_in, run_dir
        self.personal: frozenset[str] = frozenset()  # entries that stay at each hospital, once the inputs' shape is known

    def keep_personal(self, shape: tuple[int, ...]) -> frozenset[str]:
        """The strategy's entries that stay at each hospital, for the model of inputs of `shape`."""
        self.personal = self.strategy.personal_keys(self.build(shape))
        return self.personal

    def build(self, shape: tuple[int, ...]) -> torch.nn.Module:
        return build_model(self.config.model, shape, self.task.output_size, self.study_dir)

    def check(self, shape: tuple[int, ...], dp_units: Mapping[str, int]) -> None:
        """Refuse before training, not in its middle, what the model or the privacy settings forbid;
        `dp_units` are each hospital's privacy units under DP-SGD."""
        cfg = self.config
        model = self.build(shape)
        unsupported = []
        if cfg.explain.enabled:
            from fedward.explain.attribution import unsupported_layers  # shap: only in a driver that explains

            unsupported = unsupported_layers(model)
        if unsupported:
            raise ConfigError(
                f"model: DeepExplainer cannot explain {', '.join(sorted(set(unsupported)))} layers; "
                f"choose model.norm 'batch' or 'none', or set explain.enabled: false"
            )
        if cfg.privacy.dp_sgd.enabled:
            dp_sgd.check_model(model)
            for h, units in sorted(dp_units.items()):
                try:
                    dp_sgd.plan_round(cfg, units)
                except ConfigError as e:
                    raise ConfigError(f"hospital {h}: {e}") from None
        if cfg.privacy.dp_fedavg.enabled:
            dp_fedavg.noise_multiplier(cfg)  # calibrated now: an unreachable budget fails before round 1
        if cfg.privacy.masking.enabled:
            from fedward.privacy.masking import check_ring  # the masking hook's crypto: only in a driver that masks

            check_ring(cfg, flatten(model, self.personal)[1].size)
        self._check_output(model, shape)
        if cfg.model.init_weights is not None:
            self._check_initial_weights(model)
        if cfg.train.select == "best" and (self.personal or self.strategy.keeps_own_models):
            raise ConfigError(
                f"train.select: best hands on an earlier round's global weights, but strategy.name {cfg.strategy.name} keeps "
                f"{'a model' if self.strategy.keeps_own_models else 'layers'} at each hospital that went on training after it; "
                f"use train.select: last (train.patience still stops early)"
            )
        names = flatten(model, self.personal)[1].names
        unknown = sorted(set(cfg.privacy.encryption.layers or ()) - set(names)) if cfg.privacy.encryption.enabled else []
        if unknown:
            raise ConfigError(f"privacy.encryption.layers: {unknown} are not in the model; its entries are {list(names)}")

    def _check_initial_weights(self, model: torch.nn.Module) -> None:
        """The file fits the model, and no entry loaded from it stays at the hospitals, which build
        their own layers fresh; its sha256 goes into the manifest."""
        spec = self.config.model.init_weights
        digest = load_initial_weights(model, spec, self.started_in)
        lost = sorted(self.personal - set(spec.keep_initial))
        if lost:
            raise ConfigError(
                f"model.init_weights: {lost} stay at each hospital under strategy.name {self.config.strategy.name}, which builds them "
                f"afresh there, so the file's values would not reach them; list them in model.init_weights.keep_initial"
            )
        record_initial_weights(self.run_dir, spec.file, digest)

    def _check_output(self, model: torch.nn.Module, shape: tuple[int, ...]) -> None:
        """The model must give the task's output size per sample, and finite values, on inputs of
        the hospitals' shape."""
        try:
            with torch.no_grad():
                out = model.eval()(torch.zeros((2, *shape)))
        except Exception as e:  # the study's model cannot take the inputs: its own error, named
            raise ConfigError(f"{self.config.model.name}: fails on inputs of shape {shape}: {type(e).__name__}: {e}") from None
        task = self.config.task.target or f"task.kind {self.config.task.kind}"
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, self.task.output_size):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"{self.config.model.name}: gives outputs of shape {got[1:] if isinstance(got, tuple) else got} per batch of 2 samples, "
                f"but {task} needs ({self.task.output_size},) per sample"
            )
        if not torch.isfinite(out).all():
            raise ConfigError(f"{self.config.model.name}: gives non-finite outputs (NaN or infinity) for its initial weights on zero inputs")

    def initial_weights(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Layout]:
        """The global model's first weights: the factory's, seeded by the run, or model.init_weights'."""
        torch.manual_seed(self.config.run.seed)
        model = self.build(shape)
        if self.config.model.init_weights is not None:
            load_initial_weights(model, self.config.model.init_weights, self.started_in)
        return flatten(model, self.personal)
