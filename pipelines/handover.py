"""What a run hands on after its last round, each hospital's part done at the hospital.

Each hospital's own models (the global one fine-tuned on its data, one trained on its data alone)
beside the global one, the exported models, figures per patient group, explanations and each
hospital's own report. Each output is a file in the run directory whose presence says it is done
(the `*_due` checks), so a resumed run that finished its rounds only redoes what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from fedward import subgroups
from fedward.checkpoint import read_metrics
from fedward.config import FedwardConfig, config_to_dict
from fedward.errors import DataError, HospitalError
from fedward.explain.summary import to_jsonable
from fedward.files import atomic_write_json
from fedward.models.export import export_model, from_weights
from fedward.pipelines import records
from fedward.pipelines.calls import gather, opener, pooled_figures
from fedward.tasks import Task
from fedward.types import Layout


def models_out(run_dir: Path, last: int) -> bool:
    """Whether the final models and their figures were written for round `last`."""
    try:
        return json.loads((run_dir / "personalization.json").read_text())["round"] == last
    except (OSError, ValueError, KeyError):
        return False


def subgroups_due(config: FedwardConfig, run_dir: Path, last: int) -> bool:
    """Evaluate by group unless it was done for round `last` with these settings."""
    if not config.subgroups.attributes:
        return False
    try:
        done = json.loads((run_dir / "subgroups.json").read_text())
    except (OSError, ValueError):
        return True
    return done.get("round") != last or done.get("settings") != config_to_dict(config)["subgroups"] or bool(done.get("failures"))


def explanation_due(config: FedwardConfig, run_dir: Path, last: int) -> bool:
    """Explain unless the last round's explanation finished everywhere, reports included."""
    if not config.explain.enabled:
        return False
    try:
        done = json.loads((run_dir / "explanations.json").read_text())
    except (OSError, ValueError):  # absent, or torn: explaining again gives the same result
        return True
    return done["round"] != last or bool(done["failures"]) or bool(done["report_failures"])


class Handover:
    """The final stage's work with the hospitals, once the rounds are done."""

    def __init__(self, config: FedwardConfig, run_dir: Path, run_id: str, task: Task, hospitals: dict[str, Any], *,
                 personal: frozenset[str], scale: dict[str, float] | None, study_dir: str | None, log: Callable[[str], None]):
        self.config, self.run_dir, self.run_id, self.task, self.hospitals = config, run_dir, run_id, task, hospitals
        self.personal, self.scale, self.study_dir, self.log = personal, scale, study_dir, log

    def own_models(self, hospitals: list[str], weights: np.ndarray, layout: Layout, round: int, initial: np.ndarray | None, chosen: int) -> dict:
        """What each hospital gets from federating: the global model (of round `chosen`) against its
        own models (the global one fine-tuned on its data, one trained on its data alone), all
        evaluated there. For personalization.json; the same figures on a re-run (seeds derive from
        the run's)."""
        cfg = self.config
        wanted = {}
        if cfg.strategy.fine_tune_epochs:
            wanted["fine_tuned"] = (weights, cfg.strategy.fine_tune_epochs)
        if cfg.strategy.local_only:
            wanted["local_only"] = (initial, cfg.run.rounds * cfg.train.local_epochs)
        last = next(r for r in read_metrics(self.run_dir / "metrics.jsonl") if r["round"] == chosen)
        result = {"round": round, "chosen_round": chosen, "models": {"global": {"hospitals": {h: records.figures_of_record(m) for h, m in last["hospitals"].items()}, "pooled": last["pooled"]}}}
        if "personal" in last:
            result["models"]["personal"] = {k: last["personal"][k] for k in ("hospitals", "pooled")}
        for purpose, (start, epochs) in wanted.items():
            start_ref = ray.put(start)
            answers, failures = gather(
                {h: self.hospitals[h].train_own_copy.remote(round, start_ref, layout, epochs, purpose) for h in hospitals}, cfg.run.round_timeout_s
            )
            for name, why in sorted(failures.items()):
                self.log(f"{name}: its {purpose.replace('_', '-')} model failed: {why}")
            result["models"][purpose] = {
                "epochs": epochs,
                "hospitals": {h: records.figures(e) for h, e in sorted(answers.items())},
                "pooled": pooled_figures(self.hospitals, answers, cfg.run.round_timeout_s),
                "failures": failures,
            }
        return result

    def subgroups(self, hospitals: list[str], weights: np.ndarray, layout: Layout, round: int) -> dict:
        """The final global model's performance per patient group, per hospital and pooled, as each
        hospital runs it: at its own width, with its own layers where the strategy keeps some."""
        cfg = self.config
        weights_ref = ray.put(weights)
        released, failures = gather({h: self.hospitals[h].evaluate_subgroups.remote(weights_ref, layout) for h in hospitals}, cfg.run.round_timeout_s)
        for name, why in sorted(failures.items()):
            self.log(f"{name}: its evaluation per patient group failed: {why}")
        personal = self.personal
        models = {
            h: "global model" + (f" at width {cfg.hospital(h).model['width']:g}" if cfg.hospital(h).model.get("width", 1.0) < 1 else "")
            + (f" with the layers {cfg.strategy.name} keeps at the hospital" if personal else "")
            for h in hospitals
        }
        summary = subgroups.summarize(round, released, failures, models, cfg.subgroups, opener(self.hospitals, "open_group_pooled", cfg.run.round_timeout_s))
        return {**summary, "kind": cfg.data.kind, "settings": config_to_dict(cfg)["subgroups"]}

    def export(self, hospitals: list[str], shape: tuple[int, ...], preprocessing: dict | None, weights: np.ndarray, layout: Layout, round: int) -> None:
        """The final model, for scoring new patients: the global one here, and each hospital's own
        (personal layers included) in that hospital's area, never sent here. Same files on a re-run."""
        personal = self.personal
        if personal:  # their values exist only at the hospitals: a global model would hold untrained ones
            self.log(f"no global model written: {self.config.strategy.name} keeps {sorted(personal)} at each hospital; use a hospital's own model")
        else:
            export_model(
                self.run_dir / "model", from_weights(self.config.model, shape, weights, layout, self.task.output_size, self.study_dir),
                model_config=self.config.model, input_shape=shape, preprocessing=preprocessing, data_config=self.config.data,
                kind="global", hospital=None, run_id=self.run_id, round=round, task=self.config.task, scale=self.scale, study_dir=self.study_dir,
            )
        weights_ref = ray.put(weights)
        paths, failures = gather(
            {h: self.hospitals[h].export_model.remote(round, weights_ref, layout, self.run_id) for h in hospitals},
            self.config.run.round_timeout_s,
        )
        for name, path in sorted(paths.items()):
            self.log(f"{name}: its own model is at {path} on its node")
        for name, why in sorted(failures.items()):
            self.log(f"{name}: its own model could not be written: {why}")

    def explain(self, hospitals: list[str], weights: np.ndarray, layout: Layout, round: int) -> None:
        """SHAP inside each hospital, merged here; each hospital then writes its own report."""
        from fedward.explain.aggregate import merge  # shap, via the explanation's types: only in a driver that explains

        timeout = self.config.run.round_timeout_s
        weights_ref = ray.put(weights)
        summaries, failures = gather({h: self.hospitals[h].explain.remote(round, weights_ref, layout) for h in hospitals}, timeout)
        for name, why in sorted(failures.items()):
            self.log(f"explanation at {name} failed: {why}")
        if not summaries:
            raise HospitalError(f"no hospital could explain the model: {failures}")
        consortium = merge([summaries[h] for h in sorted(summaries)], self._truth())
        identity = json.loads((self.run_dir / "run.json").read_text())["identity"]
        metrics = read_metrics(self.run_dir / "metrics.jsonl")
        reports, report_failures = gather(
            {h: self.hospitals[h].write_report.remote(identity, records.own_view(metrics, h), consortium) for h in sorted(summaries)}, timeout
        )
        for name, path in sorted(reports.items()):
            self.log(f"{name}: its own report is at {path} on its node")
        for name, why in sorted(report_failures.items()):
            self.log(f"{name}: its own report failed: {why}")
        # Written last: its presence says the whole stage is done, reports included.
        atomic_write_json(
            self.run_dir / "explanations.json",
            {
                "round": round,
                "hospitals": {h: to_jsonable(summaries[h]) for h in sorted(summaries)},
                "consortium": to_jsonable(consortium),
                "failures": failures,
                "report_failures": report_failures,
            },
        )

    def _truth(self) -> dict | None:
        """The demo's known answer for the check that drivers outrank noise (tables only)."""
        if self.config.explain.truth is None or self.config.data.kind != "table":
            return None
        path = Path(self.config.explain.truth).expanduser()
        if not path.is_file():
            raise DataError(f"explain.truth: {path} does not exist")
        return json.loads(path.read_text())["ehr"]
