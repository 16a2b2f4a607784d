"""A run as a Ray job on a cluster: what `ray job submit --working-dir . -- python -m pipelines run
CONFIG` does, through Ray's Jobs API, following the job's logs to its end.

The job runs in a temporary copy of this project on the head node, so everything that must outlive
it is outside that copy: the run directory under an absolute `run.root` on the head node (a job
submitted again resumes it), and each hospital's data on its own node (FEDWARD_DATA_ROOT).
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

from fedward.config import FedwardConfig, load_config
from fedward.errors import ConfigError, DeploymentError

PROJECT = Path(__file__).resolve().parents[1]  # shipped as the job's working directory
# Never shipped: environments, data and results are the machines' own, and big.
NOT_SHIPPED = [".venv", ".git", "runs", "demo-data", "*.egg-info", "__pycache__", ".pytest_cache"]


def require_cluster_paths(config: FedwardConfig) -> None:
    """Refuse paths that cannot mean the same thing on every machine of a cluster."""
    if not Path(config.run.root).expanduser().is_absolute():
        raise ConfigError(
            f"run.root: {config.run.root!r} is relative; on a cluster give an absolute folder on the head node "
            f"(a submitted job runs in a temporary copy of the project, and a job submitted again must find the run)"
        )
    relative = [h for h in config.hospitals if h.data is not None and not Path(h.data).expanduser().is_absolute()]
    if relative:
        raise ConfigError(
            f"hospitals.{relative[0].name}.data: {relative[0].data!r} is relative, which means nothing on another machine; "
            f"leave data out and start each hospital's node with FEDWARD_DATA_ROOT, or give an absolute path"
        )


def entrypoint(config_path: Path, settings: list[str]) -> str:
    """The job's command line, run from the shipped copy of the project."""
    try:
        inside = config_path.resolve().relative_to(PROJECT)
    except ValueError:
        raise ConfigError(f"{config_path}: the config must lie inside the project folder {PROJECT}, which is what the job ships") from None
    words = ["python", "-m", "pipelines", "run", str(inside), "--no-progress"]
    for setting in settings:
        words += ["--set", setting]
    return shlex.join(words)


def submit(config_path: Path, address: str, settings: list[str], follow: bool = True) -> str:
    """Submit the run to the cluster whose dashboard is at `address`; with `follow`, print its logs
    until it ends. Returns the job's final status (or PENDING/RUNNING when not following)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    require_cluster_paths(load_config(config_path, settings))  # refused here, before anything ships
    try:
        client = JobSubmissionClient(address)
    except AuthenticationError as e:
        raise DeploymentError(
            f"{address} refused the submission: {e}\nSet RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN_PATH) before running fedward"
        ) from None
    except ConnectionError as e:
        raise DeploymentError(f"no Ray dashboard answers at {address}: {e}") from None
    job = client.submit_job(
        entrypoint=entrypoint(config_path, settings),
        runtime_env={"working_dir": str(PROJECT), "excludes": NOT_SHIPPED},
    )
    print(f"submitted job {job} to {address}", file=sys.stderr, flush=True)
    if follow:
        asyncio.run(_print_logs(client, job))
    status = str(client.get_job_status(job).value)
    if follow and status != "SUCCEEDED":
        raise DeploymentError(f"job {job} ended {status}; its logs: ray job logs {job} --address {address}")
    return status


async def _print_logs(client, job: str) -> None:
    async for lines in client.tail_job_logs(job):
        print(lines, end="", flush=True)
