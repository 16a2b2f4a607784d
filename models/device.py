"""Where a hospital's model trains, and in which precision.

The device is resolved inside the hospital's own process, from what Ray gave it: a hospital that
asked for GPUs (`hospitals[].gpus`) trains on the first GPU its process sees (Ray sets
CUDA_VISIBLE_DEVICES to those it granted), any other on the CPU. Models and batches live on the
device; everything that leaves the hospital (flat buffers, released statistics, explanations,
exported weights) is moved to the CPU first, where the model's outputs are gathered
(`fedward.tasks.base.batch_outputs`) and where `models.flat.flatten` packs the weights.

`train.precision` runs the forward pass under autocast in bfloat16 or float16; float16 scales the
loss so small gradients do not underflow. On a GPU, deterministic algorithms are asked for where
torch has them (docs/gpus.md says what stays reproducible).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from fedward.errors import DeploymentError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(gpus: float, hospital: str, setting: str | None = None) -> torch.device:
    """The device of a hospital that asked Ray for `gpus` GPUs, as its own process sees it;
    `setting` names where the number came from, for the refusal (its config entry by default)."""
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES={visible!r}"
        raise DeploymentError(f"{hospital}: {setting or f'hospitals.{hospital}.gpus'}={gpus:g}, but torch {torch.__version__} in its process sees no GPU ({build})")
    # Ray makes the GPUs it granted the only visible ones: the first is this hospital's.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    return torch.device("cuda", 0)


def device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward pass in `precision` ("fp32": as it is)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=DTYPES[precision]):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for float16, whose small gradients would underflow; a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
