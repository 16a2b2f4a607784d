"""Where a `Hospital` becomes a Ray actor: its resources and placement, nothing else.

Each hospital actor asks for its own custom resource (named after the hospital), so on a cluster
it can only run on the node that registers it, the node holding that hospital's data. The local
simulation registers all of them on the one local node.
"""

from __future__ import annotations

import ray
import torch

from actors.hospital import Hospital
from fedward.config import FedwardConfig
from fedward.errors import ConfigError


class HospitalActor(Hospital):
    def __init__(self, name: str, config: FedwardConfig):
        # One torch thread per CPU granted, so simulated hospitals sharing cores do not oversubscribe.
        torch.set_num_threads(max(1, int(config.hospital(name).cpus)))
        super().__init__(name, config)


def check_placement(config: FedwardConfig) -> None:
    """Fail early when a hospital's resource is absent: Ray would otherwise wait forever."""
    available = ray.cluster_resources()
    missing = [h.name for h in config.hospitals if available.get(h.name, 0) < 1]
    if missing:
        raise ConfigError(
            f"no node in the Ray cluster offers the resource of hospital(s) {missing}; start each "
            f"hospital's node with --resources='{{\"<hospital>\": 1}}'"
        )


def start_hospital(config: FedwardConfig, name: str) -> ray.actor.ActorHandle:
    own = config.hospital(name)
    remote_cls = ray.remote(HospitalActor)
    return remote_cls.options(
        num_cpus=own.cpus,
        resources={name: 1},
        max_restarts=3,
        max_task_retries=0,  # a failed round is left to the quorum, never silently re-run
    ).remote(name, config)
