"""A run as a Ray job on a cluster: what `ray job submit --working-dir . -- python -m fedward.pipelines run
CONFIG` does, through Ray's Jobs API, following the job's logs to its end.

The job runs in a temporary copy of this project on the head node, so everything that must outlive
it is outside that copy: the run directory under an absolute `run.root` on the head node (a job
submitted again resumes it), and each hospital's data on its own node (FEDWARD_DATA_ROOT).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

from fedward.config import FedwardConfig, load_config
from fedward.errors import ConfigError, DeploymentError

PROJECT = Path(__file__).resolve().parents[1]  # shipped as the job's working directory
# Never shipped: environments, data and results are the machines' own, and big; secrets must not
# be copied to every node that runs the job.
LOCAL_FOLDERS = (".venv", ".git", "runs", "demo-data")
NOT_SHIPPED = [*LOCAL_FOLDERS, "*.egg-info", "__pycache__", ".pytest_cache", "*.key", "auth_token"]
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def require_cluster_paths(config: FedwardConfig) -> None:
    """Refuse paths that cannot mean the same thing on every machine of a cluster: relative ones
    (read against the job's temporary copy) and ~ (expanded for the head's user, not the node's)."""
    paths = {"run.root": config.run.root}
    for h in config.hospitals:
        paths[f"hospitals.{h.name}.data"] = h.data
        paths[f"hospitals.{h.name}.work_dir"] = h.work_dir
    paths.update({"robust.trusted_data": config.robust.trusted_data, "explain.truth": config.explain.truth})
    for field, path in paths.items():
        if path is not None and not Path(path).is_absolute():
            if field == "run.root":
                hint = "an absolute folder on the head node (a job runs in a temporary copy of the project, and a job submitted again must find the run)"
            elif field.endswith(".data"):
                hint = "none at all (its node's FEDWARD_DATA_ROOT then says where the hospital's data is), or an absolute path"
            else:
                hint = "an absolute path"
            raise ConfigError(f"{field}: {path!r} is not an absolute path, which means nothing on another machine; give {hint}")


def entrypoint(config_path: Path, settings: list[str]) -> str:
    """The job's command line, run from the shipped copy of the project."""
    try:
        inside = config_path.resolve().relative_to(PROJECT)
    except ValueError:
        raise ConfigError(f"{config_path}: the config must lie inside the project folder {PROJECT}, which is what the job ships") from None
    words = ["python", "-m", "fedward.pipelines", "run", str(inside), "--no-progress"]
    for setting in settings:
        words += ["--set", setting]
    return shlex.join(words)


def pem_files() -> list[Path]:
    """PEM files in the project: they may hold private keys, which the excludes (*.key) would not
    catch and a job would copy to every node."""
    found = []
    for folder, subfolders, files in os.walk(PROJECT):
        subfolders[:] = [d for d in subfolders if d not in LOCAL_FOLDERS]
        found += [Path(folder) / f for f in files if f.endswith(".pem")]
    return sorted(found)


def submit(config_path: Path, address: str, settings: list[str], follow: bool = True) -> str:
    """Submit the run to the cluster whose dashboard is at `address`; with `follow`, print its logs
    until it ends. Returns the job's final status (or PENDING/RUNNING when not following)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address: {address!r} is not the dashboard's URL; give http://HEAD:8265 (the dashboard, not the GCS port)")
    require_cluster_paths(load_config(config_path, settings))  # refused here, before anything ships
    pems = pem_files()
    if pems:
        raise ConfigError(f"{pems[0]}: a PEM file inside the project would be shipped to every node; keep keys and certificates outside {PROJECT}")
    try:
        client = JobSubmissionClient(address)
        job = client.submit_job(
            entrypoint=entrypoint(config_path, settings),
            runtime_env={"working_dir": str(PROJECT), "excludes": NOT_SHIPPED},
        )
    except AuthenticationError as e:
        raise DeploymentError(
            f"{address} refused the submission: {e}\nSet RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN_PATH) before running fedward"
        ) from None
    except (ConnectionError, RuntimeError) as e:
        raise DeploymentError(f"could not submit to the Ray dashboard at {address}: {e}") from None
    print(f"submitted job {job} to {address}", file=sys.stderr, flush=True)
    if not follow:
        return str(client.get_job_status(job).value)
    follow_up = f"ray job logs --follow {job} --address {address} (or ray job stop {job})"
    try:
        asyncio.run(_print_logs(client, job))
    except (RuntimeError, ConnectionError, KeyboardInterrupt) as e:
        raise DeploymentError(f"stopped following job {job} ({type(e).__name__}); it may still run: {follow_up}") from None
    status = str(client.get_job_status(job).value)
    if status not in FINAL:
        raise DeploymentError(f"lost job {job}'s logs while it is {status}: {follow_up}")
    if status != "SUCCEEDED":
        raise DeploymentError(f"job {job} ended {status}; its logs: ray job logs {job} --address {address}")
    return status


async def _print_logs(client, job: str) -> None:
    async for lines in client.tail_job_logs(job):
        print(lines, end="", flush=True)
