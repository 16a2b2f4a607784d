"""Where a `Hospital` becomes a Ray actor: its resources and placement, nothing else.

This is how hospitals run on a cluster, and in a simulation that asks for `run.hosting:
per_hospital`; a simulation otherwise hosts them on a pool of shared workers (`actors/pool.py`).
Each hospital actor asks for its own custom resource (named after the hospital), so on a cluster
it can only run on the node that registers it, the node holding that hospital's data. The local
simulation registers all of them on the one local node.
"""

from __future__ import annotations

import ray
import torch

from fedward.actors.hospital import Hospital
from fedward.config import FedwardConfig
from fedward.errors import DeploymentError
from fedward.types import Placement


class HospitalActor(Hospital):
    def __init__(self, name: str, config: FedwardConfig, run_id: str, threads: int):
        # One torch thread per CPU granted, so simulated hospitals sharing cores do not oversubscribe.
        torch.set_num_threads(threads)
        super().__init__(name, config, run_id)

    def placement(self) -> Placement:
        return Placement(self.name, ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), self.deployment_problem())


def check_placement(config: FedwardConfig) -> None:
    """Fail early when no node can host a hospital: Ray would otherwise wait forever."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    problems = []
    for h in config.hospitals:
        hosts = [n for n in nodes if n["Resources"].get(h.name, 0) >= 1]
        if not hosts:
            problems.append(f"{h.name}: no node offers its resource; start its node with --resources='{{\"{h.name}\": 1}}'")
        elif len(hosts) > 1:
            where = ", ".join(n["NodeManagerAddress"] for n in hosts)
            problems.append(f"{h.name}: {len(hosts)} nodes offer its resource ({where}); only the node holding its data may")
        elif (cpus := hosts[0]["Resources"].get("CPU", 0)) < h.cpus:
            problems.append(f"{h.name}: asks for cpus={h.cpus} but its node has {cpus} CPUs; lower hospitals.{h.name}.cpus")
        elif (gpus := hosts[0]["Resources"].get("GPU", 0)) < h.gpus:
            problems.append(f"{h.name}: asks for gpus={h.gpus:g} but its node has {gpus:g} GPUs (Ray found none, or fewer); "
                            f"lower hospitals.{h.name}.gpus or start its node on a machine with them")
    if problems:
        raise DeploymentError("hospitals cannot be placed in this Ray cluster:\n  " + "\n  ".join(problems))


def start_hospital(config: FedwardConfig, name: str, run_id: str) -> ray.actor.ActorHandle:
    own = config.hospital(name)
    remote_cls = ray.remote(HospitalActor)
    return remote_cls.options(
        num_cpus=own.cpus,
        num_gpus=own.gpus,
        resources={name: 1},
        # A hospital whose process dies is restarted empty; the driver has it reload its data and
        # its own state before the next round (Rounds.rejoin). The task it was running is not
        # retried: its round goes on without it if the quorum holds.
        max_restarts=config.run.hospital_restarts,
        max_task_retries=0,
    ).remote(name, config, run_id, threads=max(1, int(own.cpus)))
