"""The driver's side of cross-site mode: each hospital reached at its own service, over the channel.

With `run.hosting: cross_site` the driver holds no hospital's data, keys or code: it opens the run
at each hospital's service (actors/site.py) with the run's config, then calls the hospital as it
would call an actor, `hospital.fit.remote(...)`. Each call travels as typed JSON (fedward/wire.py)
over mutual TLS under the driver's certified identity, in a task on the driver's own Ray, so the
rounds wait for answers, and give up on silent hospitals, exactly as they do for actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ray

from fedward import wire
from fedward.certificates import Identity, PeerRefused
from fedward.channel import call, connect, service_name
from fedward.config import FedwardConfig, config_to_dict
from fedward.errors import ConfigError, HospitalError
from fedward.types import Failure


@dataclass(frozen=True)
class Site:
    """Where a hospital's service is, and who the driver is to it."""

    hospital: str
    address: str  # host:port; its certificate names the host
    identity: Path  # the driver's identity folder
    identity_name: str
    timeout_s: float

    def ask(self, method: str, message: dict[str, Any]) -> dict[str, Any]:
        """One call to the service; its answer, or HospitalError naming why there is none."""
        host, identity = self.address.rsplit(":", 1)[0], Identity(self.identity, self.identity_name)
        try:
            named = service_name(identity, self.address, host, self.timeout_s)
        except PeerRefused as e:
            raise HospitalError(f"{self.hospital}: its service at {self.address} is refused: {e}") from None
        if named != self.hospital:
            raise HospitalError(f"{self.hospital}: the service at {self.address} is certified as {named!r}; check hospitals.{self.hospital}.address")
        try:
            with connect(identity, self.address, host) as channel:
                reply = call(channel, method, message, self.timeout_s)
        except grpc.RpcError as e:
            raise HospitalError(f"{self.hospital}: its service at {self.address} did not answer: {e.code().name}: {e.details()}") from None
        if "error" in reply:
            raise HospitalError(reply["error"])
        return reply


@ray.remote(num_cpus=0, max_retries=0)
def _call(site: Site, run_id: str, method: str, args: Any) -> Any:
    return wire.decode(site.ask("Call", {"run_id": run_id, "method": method, "args": args})["result"])


@dataclass(frozen=True)
class SiteHospital:
    """A hospital at its own service, called as its actor would be; `refused`: why it did not open the run."""

    site: Site
    run_id: str
    refused: str | None = None

    def __getattr__(self, method: str) -> _SiteMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _SiteMethod(self, method)


@dataclass(frozen=True)
class _SiteMethod:
    hospital: SiteHospital
    method: str

    def remote(self, *args: Any) -> ray.ObjectRef:
        if self.hospital.refused is not None:
            return ray.put(Failure(self.hospital.refused))
        args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        return _call.remote(self.hospital.site, self.hospital.run_id, self.method, wire.encode(args))


def open_sites(config: FedwardConfig, run_id: str) -> dict[str, SiteHospital]:
    """Open the run at every hospital's service; one that refuses or is unreachable says why in each call."""
    if with_gpus := [h.name for h in config.hospitals if h.gpus > 0]:
        raise ConfigError(f"hospitals: {with_gpus} ask for GPUs, but in run.hosting cross_site a hospital's devices are its "
                          f"operator's to grant (fedward serve --gpus); remove hospitals[].gpus from the run's config")
    identity = Path(config.run.identity).expanduser()
    message = {"run_id": run_id, "config": config_to_dict(config)}
    hospitals = {}
    for h in config.hospitals:
        # No call may wait longer than the rounds do; loading data waits longest.
        site = Site(h.name, h.address, identity, config.run.identity_name, max(config.run.round_timeout_s, config.run.data_timeout_s))
        try:
            site.ask("Open", message)
            hospitals[h.name] = SiteHospital(site, run_id)
        except HospitalError as e:
            hospitals[h.name] = SiteHospital(site, run_id, refused=f"HospitalError: {e}")
    return hospitals
