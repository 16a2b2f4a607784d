"""A hospital's own service in cross-site mode: its installed fedward, reached only over the channel.

`fedward serve` runs it on the hospital's machines, under its own identity (fedward/channel.py:
mutual TLS under the consortium's authority). It answers only the driver its operator names. The
driver opens a run by sending the run's config, which is data: the service keeps its own settings
over it (its data folder, its work area, the study folder it imports study code from, the GPUs it
trains on, and, through its policy, everything it protects). The hospital then lives in this service, as a Ray actor on the
hospital's own Ray or in the service's process, and the driver calls the methods in `CALLABLE`
with typed messages (fedward/wire.py); nothing it sends is code.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedward import wire
from fedward.certificates import Identity
from fedward.channel import serve
from fedward.config import FedwardConfig, parse_config
from fedward.errors import ConfigError, DeploymentError, released_reason
from fedward.models import device as devices
from fedward.policy import POLICY_ENV, load_policy
from fedward.types import Placement

RUN_ID = re.compile(r"[A-Za-z0-9._-]+")
# What a driver may ask of a hospital: what the pipeline asks of its actors, nothing else.
CALLABLE = frozenset({
    "placement", "load", "ready", "summarize", "summarize_targets", "prepare", "model_report", "fit", "restore", "hook_respond",
    "evaluate", "evaluate_validation", "evaluate_subgroups", "evaluate_personal", "train_own_copy", "evaluation_public_key",
    "evaluation_deal", "evaluation_accept", "open_pooled", "open_group_pooled", "explain", "write_report", "export_model",
})


@dataclass(frozen=True)
class SiteSettings:
    """The hospital's own settings, from its operator: they win over anything a run's config says."""

    name: str
    identity: Path  # folder of NAME.key, NAME.crt, ca.crt and crl.pem
    data: Path
    work_dir: Path
    policy: Path  # must put the hospital in cross-site mode (a `consortium:` section)
    study: Path | None = None  # the folder study code is imported from; None: installed packages only
    driver: str = "driver"  # the certified name of the only party it answers
    hosting: Literal["ray", "in_process"] = "ray"  # its hospital a Ray actor on its own Ray, or in this process
    gpus: float = 0  # the GPUs its hospital trains on (one): its operator's to grant, never the driver's


class HospitalService:
    def __init__(self, settings: SiteSettings):
        self.settings = settings
        self.identity = Identity(settings.identity, settings.name)
        policy = load_policy(settings.policy, settings.data)
        if policy.consortium is None:
            raise ConfigError(f"{settings.policy}: a hospital's service needs cross-site mode: its policy has no consortium section")
        if Identity(policy.consortium.identity, settings.name).certificate != self.identity.certificate:
            raise ConfigError(f"--identity {settings.identity} and the policy's consortium.identity {policy.consortium.identity} hold "
                              f"different certificates for {settings.name}: the service and its signatures must be one identity")
        if not (math.isfinite(settings.gpus) and settings.gpus >= 0):
            raise ConfigError(f"--gpus {settings.gpus:g}: expected a number of GPUs, 0 or more")
        os.environ[POLICY_ENV] = str(settings.policy)  # the hospital reads its policy from here, whatever the run says
        self._lock = threading.Lock()  # one run's calls at a time, in the order they come
        self._hospital: Any = None
        self._run_id: str | None = None
        if settings.hosting == "ray":  # started before the service listens: a first call does not wait for it
            import ray

            if not ray.is_initialized():
                ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            if (seen := ray.cluster_resources().get("GPU", 0)) < settings.gpus:  # else its actor would wait forever
                raise DeploymentError(f"--gpus {settings.gpus:g}: the hospital's own Ray has {seen:g} GPUs; start the service on a "
                                      f"machine with them, or lower --gpus")
        elif settings.gpus > 0:
            devices.resolve(settings.gpus, settings.name, "--gpus")  # refused now, not at its first run

    def methods(self) -> dict[str, Any]:
        return {"Open": self.open, "Call": self.call}

    def open(self, message: dict[str, Any], caller: str) -> dict[str, Any]:
        """Start (or restart) the hospital for a run: {"config": its config, "run_id": its id}."""
        if refusal := self._refusal(caller):
            return {"error": refusal}
        run_id, raw = message.get("run_id"), message.get("config")
        if not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id) and run_id not in (".", "..") and isinstance(raw, dict)):
            return {"error": f"{self.settings.name}: Open expects a run_id of letters, digits, '.', '_' or '-' (it names a folder "
                             f"in the hospital's work area) and a config mapping"}
        try:
            config = self._own(raw)
            with self._lock:
                self._hospital, self._run_id = self._host(config, run_id), run_id
        except Exception as e:  # noqa: BLE001 - a run it cannot open is refused; the service goes on
            return {"error": released_reason(e)}
        return {"opened": run_id}

    def call(self, message: dict[str, Any], caller: str) -> dict[str, Any]:
        """One call of the hospital's: {"run_id", "method", "args"}; the answer or the reason it failed."""
        if refusal := self._refusal(caller):
            return {"error": refusal}
        method = message.get("method")
        if method not in CALLABLE:
            return {"error": f"{self.settings.name}: {method!r} is not a call a driver may make"}
        try:
            args = wire.decode(message.get("args", []))
            with self._lock:
                if self._hospital is None or message.get("run_id") != self._run_id:
                    return {"error": f"{self.settings.name}: run {message.get('run_id')!r} is not open here; the driver opens it first"}
                result = self._placement() if method == "placement" else self._hospital(method, *args)
            return {"result": wire.encode(result)}
        except Exception as e:  # noqa: BLE001 - the hospital's failure is its answer; the service goes on
            return {"error": released_reason(getattr(e, "cause", None) or e)}

    def _refusal(self, caller: str) -> str | None:
        if caller != self.settings.driver:
            return f"{self.settings.name} answers only the driver {self.settings.driver!r}, not {caller!r}"
        return None

    def _own(self, raw: dict[str, Any]) -> FedwardConfig:
        """The run's config with the hospital's own settings in place of what the driver sent."""
        raw = dict(raw)
        hospitals = [h for h in raw.get("hospitals", []) if isinstance(h, dict) and h.get("name") == self.settings.name]
        if len(hospitals) != 1:
            raise ConfigError(f"{self.settings.name}: the run's config does not name this hospital once among its hospitals")
        own = {**hospitals[0], "data": str(self.settings.data), "work_dir": str(self.settings.work_dir), "gpus": self.settings.gpus}
        raw["hospitals"] = [own if h is hospitals[0] else h for h in raw["hospitals"]]
        raw["run"] = {**raw.get("run", {}), "study_dir": str(self.settings.study) if self.settings.study else None}
        return parse_config(raw)

    def _host(self, config: FedwardConfig, run_id: str):
        """A call of the hospital's methods: on its own Ray, or in this process."""
        from fedward.actors.remote import HospitalActor

        if self.settings.hosting == "in_process":
            hospital = HospitalActor(self.settings.name, config, run_id, threads=max(1, os.cpu_count() or 1))
            return lambda method, *args: getattr(hospital, method)(*args)
        import ray

        actor = ray.remote(HospitalActor).options(num_cpus=0, num_gpus=self.settings.gpus, max_restarts=0).remote(self.settings.name, config, run_id, threads=max(1, os.cpu_count() or 1))
        return lambda method, *args: ray.get(getattr(actor, method).remote(*args))

    def _placement(self) -> Placement:
        problem = None if self.settings.data.is_dir() else f"{self.settings.name}: data folder {self.settings.data} does not exist on its machine"
        return Placement(self.settings.name, "site", self.settings.name, problem)


def serve_hospital(settings: SiteSettings, address: str) -> tuple[Any, int]:
    """Start the hospital's service on `address` (host:port); returns the server and its port."""
    service = HospitalService(settings)
    return serve(service.identity, address, service.methods())
