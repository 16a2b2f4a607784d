"""The Flower side of benchmarks/overhead.py: the same FedAvg workload in Flower's simulation engine.

    python flower_side.py TENSORS_DIR --rounds R --project /work/main

One Flower client per TENSORS_DIR/*.pt (a hospital's training tensors, as overhead.py exports them),
each training with the project's own models.training.train, so every side takes the same optimizer
steps. Run with the Flower venv's python (Flower pins another Ray than fedward's). The last line on
stdout is the JSON overhead.py reads from its plain side: first_round_at, rounds, steps.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Before flwr is imported; Ray's processes inherit it too.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

CONFIG = "configs/demo_images.yaml"  # relative to the project root, as overhead.py's CONFIG


@functools.cache
def project(root: str):
    """The project's config and training code, imported once per process from `root`."""
    if root not in sys.path:
        sys.path.insert(0, root)
    from fedward.config import load_config
    from fedward.models import training
    from fedward.models.networks import build_model

    return load_config(Path(root) / CONFIG), training, build_model


# -- the client ------------------------------------------------------------------------------------

# A hospital keeps its data between rounds, as the plain side's processes do. This module (not
# __main__, see the end of the file) is imported once per Ray actor, so the cache lasts as long as
# the actor; each of the 2 actors may serve any client and so reads each file at most once.
_TENSORS: dict[str, dict] = {}

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    torch.set_num_threads(1)  # one core per actor, as the plain side's processes
    settings = msg.content["config"]
    config, training, build_model = project(str(settings["project"]))
    files = sorted(Path(str(settings["tensors"])).glob("*.pt"))
    partition, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    if partitions != len(files):
        raise RuntimeError(f"{partitions} Flower clients for {len(files)} tensor files")
    path = str(files[partition])
    if path not in _TENSORS:
        _TENSORS[path] = torch.load(path)
    x, y = _TENSORS[path]["x"], _TENSORS[path]["y"]
    model = build_model(config.model, tuple(x.shape[1:]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    round_ = int(settings["server-round"])
    training.train(model, x, y, epochs=config.train.local_epochs, lr=config.train.lr, seed=round_, config=config.train)
    metrics = MetricRecord({
        "num-examples": len(y),  # FedAvg's weight, as the plain side weights by samples
        "steps": training.local_steps(len(y), config.train.local_epochs, config.train.batch_size),
        "partition-id": partition,
        "started-at": started,
    })
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


# -- the server ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What main() sets for the server thread, and what the strategy records for main() to print."""

    tensors: Path = Path()
    project: Path = Path()
    clients: int = 0
    rounds: int = 0
    began: dict[int, float] = field(default_factory=dict)  # round -> when configure_train was called
    ended: dict[int, float] = field(default_factory=dict)  # round -> when aggregate_train was done
    first_fit: float = 0.0  # the earliest start of a client's training in round 1
    steps: int = 0


RUN = Run()


class ClientFailure(RuntimeError):
    pass


class TimedFedAvg(FedAvg):
    """FedAvg that times rounds and refuses a round any client did not complete.

    Flower reports a failed or late client only in a log line and averages what came back, so
    each round is checked here for one good reply from every client, and raises otherwise (which
    ends the simulation and reaches main()).
    """

    def configure_train(self, server_round, arrays, config, grid):
        RUN.began[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        good = [r for r in replies if not r.has_error()]
        errors = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
        answered = {int(r.content["metrics"]["partition-id"]) for r in good}
        if len(good) != RUN.clients or answered != set(range(RUN.clients)):
            missing = sorted(set(range(RUN.clients)) - answered)
            raise ClientFailure(f"round {server_round}: {len(good)} of {RUN.clients} clients answered; "
                                f"missing partitions {missing}; errors: {errors or 'none (timed out?)'}")
        if server_round == 1:
            RUN.first_fit = min(float(r.content["metrics"]["started-at"]) for r in good)
        RUN.steps += sum(int(r.content["metrics"]["steps"]) for r in good)
        result = super().aggregate_train(server_round, good)
        RUN.ended[server_round] = time.time()
        return result


def total_steps(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """For Flower's round log: the default would average every metric, partition ids and times too."""
    return MetricRecord({"steps": sum(int(r["metrics"]["steps"]) for r in records)})


server_app = ServerApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    config, _, build_model = project(str(RUN.project))
    first = torch.load(sorted(RUN.tensors.glob("*.pt"))[0])
    model = build_model(config.model, tuple(first["x"].shape[1:]))
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0,  # the plain side evaluates nothing either
                           min_train_nodes=RUN.clients, min_available_nodes=RUN.clients,
                           train_metrics_aggr_fn=total_steps)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=RUN.rounds,
                   train_config=ConfigRecord({"project": str(RUN.project), "tensors": str(RUN.tensors)}))


def round_seconds() -> list[float]:
    """Seconds per round, from the server's side.

    A round runs from configure_train (the server hands out the global weights) to the end of
    aggregate_train (the new global weights exist), as the plain side times dispatch, training and
    averaging. Round 1 is the exception: the server thread starts alongside the simulation engine,
    so its first configure_train comes before Ray and the actors are up and that wait is start-up,
    which overhead.py counts in "first round"; round 1 starts instead when the first client starts
    training, the same moment reported as first_round_at.
    """
    starts = {**RUN.began, 1: RUN.first_fit}
    return [RUN.ended[r] - starts[r] for r in range(1, RUN.rounds + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tensors", type=Path)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--project", type=Path, required=True)
    args = parser.parse_args()
    RUN.tensors, RUN.project, RUN.rounds = args.tensors.resolve(), args.project.resolve(), args.rounds
    RUN.clients = len(list(RUN.tensors.glob("*.pt")))
    if not RUN.clients:
        sys.exit(f"no *.pt files in {RUN.tensors}")

    # Short, under /tmp: Ray puts its sockets in here and AF_UNIX paths stop at ~107 bytes.
    ray_dir = tempfile.mkdtemp(prefix="fl", dir="/tmp")
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # 2 actors, one per core
        "init_args": {
            "address": "local",  # a Ray of its own, never one already running on this machine
            "num_cpus": 2,
            "include_dashboard": False,
            "_temp_dir": ray_dir,
            "object_store_memory": 500 * 1024**2,  # what fedward's embedded Ray gets (pipelines/run.py)
            "logging_level": "WARNING",
            "log_to_driver": False,  # as fedward: actors' output stays in Ray's logs
        },
    }
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=RUN.clients,
                       backend_config=backend_config)
    except ClientFailure as failure:
        sys.exit(f"Flower run failed: {failure}")
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    # A server that stopped early for any other reason may not have raised.
    if sorted(RUN.ended) != list(range(1, RUN.rounds + 1)):
        sys.exit(f"Flower run failed: {len(RUN.ended)} of {RUN.rounds} rounds completed")
    print(json.dumps({"first_round_at": RUN.first_fit, "rounds": round_seconds(), "steps": RUN.steps}), flush=True)


if __name__ == "__main__":
    # Run everything from this file imported as a module rather than as __main__: Ray pickles
    # functions of __main__ by value with every message, so each call would start with an empty
    # tensor cache; a module's are pickled by reference and imported once per actor (Flower puts
    # this directory on the actors' PYTHONPATH). Server state then also lives in that one module.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    importlib.import_module(Path(__file__).stem).main()
