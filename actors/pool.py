"""Many simulated hospitals on a few worker processes, so a laptop can simulate a thousand.

A `HospitalWorker` hosts the hospitals given to it, each an ordinary `Hospital`, and runs their
calls one at a time: a pool of one worker per core keeps every core busy without the memory and
start-up of a process per hospital. It keeps the hospitals it called last in memory and puts the
others to sleep on disk, each in its own work area, until it is called again. The driver calls a
hosted hospital through a `HostedHospital`, as it would call the hospital's own actor.

`run.hosting: in_process` hosts every hospital in the driver's own process instead
(`start_in_process`): a debugger steps from the driver into a hospital's code, and tests run many
small federations without starting a process per run. Nothing then isolates a hospital from another
or from the driver, calls run one after another, and no deadline applies (`run.round_timeout_s`,
late updates and the `slow` attack need hospitals of their own).

On a cluster every hospital keeps its own actor on the node holding its data (`actors/remote.py`).
"""

from __future__ import annotations

import pickle
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from fedward.actors.remote import HospitalActor
from fedward.config import FedwardConfig
from fedward.errors import released_reason
from fedward.types import Failure
from fedward.privacy.hooks import AggregationHook


class HospitalWorker:
    def __init__(self, config: FedwardConfig, run_id: str, threads: int, resident: int):
        torch.set_num_threads(threads)
        self.config, self.run_id, self.threads, self.resident = config, run_id, threads, resident
        self.awake: OrderedDict[str, HospitalActor] = OrderedDict()  # least recently called first
        self.asleep: dict[str, Path] = {}
        # A hook holds live keys (a TenSEAL context cannot be pickled) and stays in memory: it is small.
        self.hooks: dict[str, AggregationHook] = {}

    def call(self, hospital: str, method: str, *args: Any) -> Any:
        return getattr(self._wake(hospital), method)(*args)

    def hosted(self) -> dict[str, list[str]]:
        """Which of its hospitals are in memory and which asleep on disk."""
        return {"awake": list(self.awake), "asleep": sorted(self.asleep)}

    def _wake(self, name: str) -> HospitalActor:
        if name in self.awake:
            self.awake.move_to_end(name)
            return self.awake[name]
        if name in self.asleep:
            path = self.asleep.pop(name)
            with open(path, "rb") as f:
                hospital = pickle.load(f)
            path.unlink()  # a copy of its data: it lives only while the hospital sleeps
            hospital.hook = self.hooks.pop(name)
        else:
            # Created on its first call, and again after Ray restarted this worker: it then answers
            # ready() with False and the driver has it reload (Rounds.rejoin). Sleepers written
            # by the dead process are never read back.
            hospital = HospitalActor(name, self.config, self.run_id, threads=self.threads)
        self.awake[name] = hospital
        while len(self.awake) > self.resident:
            self._sleep(next(iter(self.awake)))
        return hospital

    def _sleep(self, name: str) -> None:
        hospital = self.awake.pop(name)
        self.hooks[name], hospital.hook = hospital.hook, None
        path = hospital.work_dir / "asleep" / f"{self.run_id}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(hospital, f, protocol=pickle.HIGHEST_PROTOCOL)
        self.asleep[name] = path


@dataclass(frozen=True)
class HostedHospital:
    """A hospital on a shared worker, called as its own actor would be: `hospital.fit.remote(...)`."""

    worker: ray.actor.ActorHandle
    name: str

    def __getattr__(self, method: str) -> _HostedMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _HostedMethod(self.worker, self.name, method)


@dataclass(frozen=True)
class _HostedMethod:
    worker: ray.actor.ActorHandle
    hospital: str
    method: str

    def remote(self, *args: Any) -> ray.ObjectRef:
        return self.worker.call.remote(self.hospital, self.method, *args)


@dataclass(frozen=True)
class InProcessHospital:
    """A hospital in the driver's process, called as its own actor would be: `hospital.fit.remote(...)`
    runs the call at once and returns a reference to its result, or to a `Failure` (its traceback
    printed), which costs the hospital its place in the round as an actor's error would. Calls run
    one after another as they are made, so no timeout applies: a hospital that hangs hangs the run."""

    hospital: HospitalActor

    def __getattr__(self, method: str) -> _InProcessMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _InProcessMethod(getattr(self.hospital, method))


@dataclass(frozen=True)
class _InProcessMethod:
    call: Any

    def remote(self, *args: Any) -> ray.ObjectRef:
        args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)
        try:
            return ray.put(self.call(*args))
        except Exception as e:  # noqa: BLE001 - one hospital's failure, reported as an actor's would be
            traceback.print_exc()  # the hospital's log is the driver's: the whole traceback, for the debugger's user
            return ray.put(Failure(released_reason(e)))


def start_in_process(config: FedwardConfig, run_id: str) -> dict[str, InProcessHospital]:
    threads = max(1, torch.get_num_threads())
    return {h.name: InProcessHospital(HospitalActor(h.name, config, run_id, threads=threads)) for h in config.hospitals}


def start_pool(config: FedwardConfig, run_id: str) -> tuple[dict[str, HostedHospital], list[ray.actor.ActorHandle]]:
    """The hospitals spread evenly over the pool's workers; returns them and the workers."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    names = [h.name for h in config.hospitals]
    count = min(len(names), config.run.workers or cpus)
    # No CPU reservation: the pool is sized to the cores, and an actor whose CPUs cannot be met
    # would wait forever.
    remote_cls = ray.remote(HospitalWorker).options(num_cpus=0, max_restarts=config.run.hospital_restarts, max_task_retries=0)
    workers = [remote_cls.remote(config, run_id, max(1, cpus // count), config.run.resident_hospitals) for _ in range(count)]
    return {name: HostedHospital(workers[i % count], name) for i, name in enumerate(names)}, workers
