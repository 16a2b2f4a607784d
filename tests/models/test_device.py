"""Devices and precision, as far as a machine without a GPU shows them: where a hospital trains,
what hosting can grant GPUs, which precisions train and which are refused, and what the run's
identity holds. The GPU path's figures come from benchmarks/gpu.py on a GPU machine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedward.actors.hospital import Hospital
from fedward.actors.site import HospitalService, SiteSettings
from fedward.actors.remote import check_placement
from fedward.config import TrainConfig, config_hash, parse_config
from fedward.data_adapters.harmonize import merge_summaries
from fedward.errors import ConfigError, DeploymentError, HospitalError
from fedward.models import device, training
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.pipelines import compatibility
from fedward.pipelines.run import pooled
from fedward.policy import POLICY_ENV
from fedward.pipelines.sites import open_sites
from fedward.tasks.base import batch_outputs
from fedward.types import RoundPlan
from tests.conftest import ehr_config
from tests.consortium import consortium


def test_a_hospital_without_gpus_trains_on_the_cpu_and_one_asking_for_gpus_where_torch_sees_none_is_told_why():
    assert device.resolve(0, "hospital_a") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    with pytest.raises(DeploymentError, match=r"hospital_a: hospitals.hospital_a.gpus=1, but torch .* in its process sees no GPU"):
        device.resolve(1, "hospital_a")


def config_with(demo_data, tmp_path, precision: str) -> dict:
    raw = ehr_config(demo_data, tmp_path)
    raw["train"]["precision"] = precision
    return raw


def test_gpus_are_granted_only_by_hosting_that_can_and_reduced_precision_is_refused_under_dp_sgd(demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path)
    raw["hospitals"][0]["gpus"] = 1
    assert not pooled(parse_config(raw), None)  # auto: a hospital with GPUs gets a process of its own
    with pytest.raises(ConfigError, match=r"\['hospital_a'\] ask for GPUs; run.hosting pool cannot grant them"):
        parse_config({**raw, "run": {**raw["run"], "hosting": "pool"}})
    across = copy.deepcopy(raw)
    across["run"].update({"hosting": "cross_site", "identity": str(tmp_path / "nowhere")})
    across["hospitals"] = [{**h, "address": "127.0.0.1:1"} for h in across["hospitals"]]
    with pytest.raises(ConfigError, match=r"\['hospital_a'\] ask for GPUs, but in run.hosting cross_site a hospital's devices are its operator's"):
        open_sites(parse_config(across), "r")  # before any site is called
    private = config_with(demo_data, tmp_path, "bf16")
    private["privacy"] = {"dp_sgd": {"enabled": True, "noise_multiplier": 1.0, "epsilon": 10.0}}
    with pytest.raises(ConfigError, match="train.precision: bf16 with privacy.dp_sgd: per-sample clipping and the accountant are shown to hold in float32 only"):
        parse_config(private)


def test_a_hospital_asking_for_more_gpus_than_its_node_has_stops_the_run_before_ray_waits_forever(demo_data, tmp_path, ray_session):
    raw = ehr_config(demo_data, tmp_path)
    raw["hospitals"][2]["gpus"] = 1
    gpus = ray_session.cluster_resources().get("GPU", 0)
    if gpus >= 1:
        pytest.skip("this Ray has a GPU")
    with pytest.raises(DeploymentError, match=r"hospital_c: asks for gpus=1 but its node has 0 GPUs"):
        check_placement(parse_config(raw))


def test_a_hospitals_own_service_grants_its_gpus_and_refuses_at_start_those_its_machine_lacks(demo_data, tmp_path, ray_session, monkeypatch):
    """In cross-site mode the GPUs are the operator's (`fedward serve --gpus`): checked when the
    service starts, not at a run's first round, where Ray would wait forever for them."""
    monkeypatch.setenv(POLICY_ENV, "")  # the service points its process at its policy: restored after the test
    consortium(tmp_path / "pki", ["hospital_a"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"consortium: {{identity: {tmp_path / 'pki' / 'hospital_a'}, roster: [hospital_a, hospital_b], fewest_hospitals: 2}}\n")

    def service(hosting: str, gpus: float) -> HospitalService:
        return HospitalService(SiteSettings(name="hospital_a", identity=tmp_path / "pki" / "hospital_a", data=tmp_path, work_dir=tmp_path / "work",
                                            policy=policy, hosting=hosting, gpus=gpus))

    sent = ehr_config(demo_data, tmp_path)
    sent["hospitals"][0]["gpus"] = 3
    own = service("in_process", 0)._own(sent)
    assert own.hospital("hospital_a").gpus == 0  # what the driver sent is replaced by the operator's setting
    with pytest.raises(ConfigError, match=r"--gpus -1: expected a number of GPUs, 0 or more"):
        service("in_process", -1)
    if ray_session.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeploymentError, match=r"--gpus 1: the hospital's own Ray has 0 GPUs"):
        service("ray", 1)
    with pytest.raises(DeploymentError, match=r"hospital_a: --gpus=1, but torch .* in its process sees no GPU"):
        service("in_process", 1)


def test_precision_changes_the_runs_identity_and_the_device_does_not(demo_data, tmp_path):
    plain = parse_config(ehr_config(demo_data, tmp_path))
    on_gpu = ehr_config(demo_data, tmp_path)
    on_gpu["hospitals"][1]["gpus"] = 1
    assert config_hash(parse_config(on_gpu)) == config_hash(plain)  # a resume may move to another device (docs/gpus.md)
    assert config_hash(parse_config(config_with(demo_data, tmp_path, "fp32"))) == config_hash(plain)
    assert config_hash(parse_config(config_with(demo_data, tmp_path, "bf16"))) != config_hash(plain)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_close_to_float32_and_keeps_float32_weights(precision):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((256, 8)).astype(np.float32))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float()

    def trained(precision: str) -> tuple[float, np.ndarray]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        loss = training.train(model, x, y, epochs=3, lr=0.1, seed=1, config=TrainConfig(precision=precision, momentum=0.0))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return loss, flatten(model)[0]

    (loss, weights), (reference_loss, reference) = trained(precision), trained("fp32")
    assert not np.array_equal(weights, reference)  # autocast did run in the lower precision
    assert loss == pytest.approx(reference_loss, rel=0.02)
    assert np.abs(weights - reference).max() < 0.05


def test_every_boundary_of_a_hospital_is_on_the_cpu_and_float32(demo_data, tmp_path):
    config = parse_config(config_with(demo_data, tmp_path, "bf16"))
    hospital = Hospital("hospital_a", config, "devices")
    hospital.load()
    shape = hospital.prepare(merge_summaries([hospital.summarize()], config.data.table).to_dict())
    weights, layout = flatten(build_model(config.model, shape, 1))
    update = hospital.fit(RoundPlan(1, "hospital_a", seed=5, local_epochs=1, lr=0.05), weights, layout)
    assert hospital.device == torch.device("cpu") and update.delta.dtype == np.float32 and np.isfinite(update.delta).all()
    outputs = batch_outputs(hospital.model, hospital.x[:10])
    assert outputs.device == torch.device("cpu") and outputs.dtype == torch.float32
    assert hospital.evaluate(1, weights + update.delta, layout).figures["auroc"] > 0.5


def test_a_loss_that_turns_non_finite_stops_training_naming_its_first_step():
    """Losses are read once an epoch, not each step (each read waits for a GPU), but the first bad
    step is still the one named."""
    x, y = torch.ones((64, 4)), torch.ones(64)
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(3))  # train's own order for seed 3
    x[shuffled[20], 2] = float("nan")  # one bad input, in the second of the epoch's four batches
    with pytest.raises(HospitalError, match=r"training: the model's loss is nan at step 2; check the model's outputs"):
        training.train(torch.nn.Linear(4, 1), x, y, epochs=2, lr=0.1, seed=3, config=TrainConfig(batch_size=16, momentum=0.0))


def test_fp16_whose_loss_scaling_skips_steps_is_refused_with_scaffold_and_bf16_is_not(demo_data, tmp_path):
    raw = config_with(demo_data, tmp_path, "fp16")
    raw["train"]["momentum"] = 0.0
    raw["strategy"] = {"name": "scaffold"}
    with pytest.raises(ConfigError, match="strategy.name: scaffold cannot run with train.precision: fp16: strategy.name: scaffold derives its "
                                          "control update from plain SGD steps, but train.precision: fp16 skips any step whose loss-scaled gradients overflow"):
        compatibility.check(parse_config(raw))
    raw["train"]["precision"] = "bf16"
    compatibility.check(parse_config(raw))
