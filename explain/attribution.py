"""SHAP values of a model's logit, computed with shap's DeepExplainer and checked for additivity.

DeepExplainer (DeepLIFT with a background distribution) propagates attributions layer by layer
with one rule per module type. A module it has no rule for would be passed through silently with
plain gradients, which breaks the SHAP guarantee without a word; so the model's layers are checked
against shap's own table of rules before anything runs, and the result carries its measured
additivity error (base value + sum of SHAP values against the model's output) for every report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import shap
import torch
from shap.explainers._deep.deep_pytorch import op_handler
from torch import nn

from fedward.errors import HospitalError


@dataclass(frozen=True)
class Attributions:
    values: np.ndarray  # float64 (N, *one sample's shape): SHAP of the logit per input column or pixel
    base_value: float  # the explainer's expected logit over the background
    outputs: np.ndarray  # float64 (N,): the model's logits for the explained samples
    additivity_error: float  # max over samples of |base_value + values[i].sum() - outputs[i]|


def unsupported_layers(model: nn.Module) -> list[str]:
    """Type names of the model's layers that DeepExplainer has no attribution rule for.

    shap hooks only leaf modules (those without children), so only they need a rule.
    """
    leaves = (m for m in model.modules() if next(m.children(), None) is None)
    return sorted({type(m).__name__ for m in leaves} - set(op_handler))


def deep_shap(model: nn.Module, background: torch.Tensor, samples: torch.Tensor) -> Attributions:
    """SHAP values of `model`'s single logit for `samples`, against `background`, in eval mode.

    The explainer works on a copy of the model: it sets eval mode and leaves hooks and cached
    activations on the modules it walks, none of which may reach the caller's model.
    """
    unsupported = unsupported_layers(model)
    if unsupported:
        raise HospitalError(
            f"the model has layers SHAP's DeepExplainer cannot explain: {', '.join(unsupported)}; "
            f"it supports {', '.join(sorted(op_handler))} (GroupNorm models, used for DP-SGD, cannot be explained this way)"
        )
    if len(background) == 0 or len(samples) == 0:
        raise HospitalError(f"explaining needs background and samples; got {len(background)} and {len(samples)}")
    model = copy.deepcopy(model).eval()
    background, samples = background.detach().float(), samples.detach().float()
    with torch.no_grad():
        logits = model(samples)
    if logits.ndim != 2 or logits.shape[1] != 1:
        raise HospitalError(f"the model must output one logit per sample, shape (N, 1); it outputs {tuple(logits.shape)}")
    explainer = shap.DeepExplainer(model, background)
    # shap's own check raises a bare assertion; the error is measured below and reported instead.
    values = np.asarray(explainer.shap_values(samples, check_additivity=False), dtype=np.float64)[..., 0]
    base_value = float(np.asarray(explainer.expected_value).reshape(-1)[0])
    outputs = logits[:, 0].double().numpy()
    error = np.abs(base_value + values.reshape(len(values), -1).sum(axis=1) - outputs).max()
    return Attributions(values=values, base_value=base_value, outputs=outputs, additivity_error=float(error))
