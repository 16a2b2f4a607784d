"""Which settings run together, read from the components' own declarations.

`declarations` lists every component a config turns on, each declared where it lives: the task and
the strategy, the models hospitals train for themselves, the model's normalization and the local
optimizer, the steps of an update's way out of a hospital (actors/outbound.py) and into the
aggregate (pipelines/inbound.py), hospitals training narrower sub-models, explanations and
figures per patient group. `check` refuses a config where one of them breaks what another needs,
naming both settings (fedward/declarations.py); the pipeline calls it before Ray starts.

`SETTINGS` are the settings the compatibility table of docs/tasks-and-models.md crosses with the
tasks, and `table` writes that table (`python -m fedward.pipelines.compatibility`); a test runs
every cell it calls runnable and refuses every other.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from fedward.actors import outbound
from fedward.config import FedwardConfig, parse_config
from fedward.declarations import Declaration, require_compatible
from fedward.errors import ConfigError
from fedward.explain.summary import DECLARATION as EXPLANATIONS
from fedward.models.networks import declaration as norm_declaration
from fedward.models.training import optimizer_declaration, precision_declaration
from fedward.pipelines import inbound
from fedward.privacy import dp_sgd
from fedward.privacy.hooks import build_hook
from fedward.strategies import build_strategy
from fedward.strategies.base import own_model_declarations
from fedward.subgroups import DECLARATION as SUBGROUPS
from fedward.tasks import build_task
from fedward import width


def declarations(config: FedwardConfig, study_dir: str | None = None) -> list[Declaration]:
    """Every component `config` turns on, declared; the hospital's steps in the order an update takes them."""
    hook = build_hook(config, None, config.run.name)
    found = [
        build_task(config.task, study_dir).declaration(),
        build_strategy(config, study_dir).declaration(),
        *own_model_declarations(config),
        norm_declaration(config.model),
        optimizer_declaration(config.train),
        precision_declaration(config.train),
        dp_sgd.DECLARATION if config.privacy.dp_sgd.enabled else None,
        *(step.declaration for step in outbound.steps(config, hook, hospital="")),
        *(step.declaration for step in inbound.steps(config, hook)),
        EXPLANATIONS if config.explain.enabled else None,
        SUBGROUPS if config.subgroups.attributes else None,
    ]
    narrow = sorted(h.name for h in config.hospitals if h.model.get("width", 1.0) < 1)
    if narrow:
        found.append(width.declaration(narrow))
    return [d for d in found if d is not None]


def check(config: FedwardConfig, study_dir: str | None = None) -> None:
    """Refuse a config whose components cannot run together, naming both settings of a conflict."""
    require_compatible(declarations(config, study_dir))


# -- the table of docs/tasks-and-models.md ----------------------------------------------------------

TASKS: dict[str, dict[str, Any]] = {
    "binary": {"kind": "binary"},
    "multiclass": {"kind": "multiclass", "classes": ["low", "mid", "high"]},
    "regression": {"kind": "regression"},
}
LABELS = {"binary": {"column": "outcome", "positive_values": ["yes"], "negative_values": ["no"]}, "multiclass": {"column": "grade"},
          "regression": {"column": "stay"}}
THREE = {"run": {"min_hospitals": 3}}  # rules that drop or trim hospitals need three in every round

# Each setting as the table names it, with what turns it on over the plain config below.
SETTINGS: dict[str, dict[str, Any]] = {
    **{f"strategy.name: {name}": {"strategy": {"name": name}} for name in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedper", "fedrep", "ditto")},
    "strategy.name: scaffold": {"strategy": {"name": "scaffold"}, "train": {"momentum": 0.0}},
    "strategy.name: fedbn": {"strategy": {"name": "fedbn"}, "model": {"norm": "batch"}},
    "privacy.masking": {"privacy": {"masking": {"enabled": True}}, **THREE},
    "privacy.encryption": {"privacy": {"encryption": {"enabled": True}}},
    "privacy.dp_sgd": {"privacy": {"dp_sgd": {"enabled": True, "epsilon": 8.0}}},
    "privacy.dp_fedavg": {"privacy": {"dp_fedavg": {"enabled": True, "epsilon": 8.0}}},
    "robust.rule: median": {"robust": {"rule": "median"}},
    "robust.rule: trimmed_mean": {"robust": {"rule": "trimmed_mean", "trim": 0.34}, **THREE},
    "robust.rule: krum": {"robust": {"rule": "krum", "byzantine": 0}, **THREE},
    "robust.rule: multi_krum": {"robust": {"rule": "multi_krum", "byzantine": 0}, **THREE},
    "robust.rule: fltrust": {"robust": {"rule": "fltrust", "trusted_data": "TRUSTED"}},
    "robust.norm_bound": {"robust": {"norm_bound": 1.0}},
    "compression.kind: int8": {"compression": {"kind": "int8"}},
    "compression.kind: top_k": {"compression": {"kind": "top_k"}},
    "strategy.fine_tune_epochs": {"strategy": {"fine_tune_epochs": 1}},
    "strategy.local_only": {"strategy": {"local_only": True}},
    "explain.enabled": {"explain": {"enabled": True}},
    "subgroups": {"subgroups": {"sex": "sex"}},
}


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def plain_config(task: str, folder: str = "DATA", run_root: str = "runs") -> dict:
    """The config every cell starts from: three hospitals' tables, a tiny network, one round."""
    return copy.deepcopy({
        "run": {"name": "cell", "root": run_root, "rounds": 1, "min_hospitals": 2},
        "task": TASKS[task],
        "data": {"kind": "table", "min_samples": 20, "table": {"file": "records.csv", "patient_id": "patient", "label": LABELS[task],
                 "features": {"age": "numeric", "marker": "numeric", "sex": "categorical"}}},
        "model": {"kind": "mlp", "hidden": [8]},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "explain": {"enabled": False},
        "hospitals": [{"name": h, "data": f"{folder}/{h}"} for h in ("hospital_a", "hospital_b", "hospital_c")],
    })  # a copy: callers change it


def cell(task: str, *settings: str, folder: str = "DATA", run_root: str = "runs") -> dict:
    """The raw config of `task` with `settings` on."""
    raw = plain_config(task, folder, run_root)
    for setting in settings:
        raw = _merged(raw, SETTINGS[setting])
    return raw


def refusal(raw: dict) -> str | None:
    """Why a raw config cannot run (None: it can)."""
    try:
        check(parse_config(raw))
    except ConfigError as e:
        return str(e)
    return None


def table() -> str:
    """docs/tasks-and-models.md's compatibility section, from the declarations."""
    lines = ["| setting | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for setting in SETTINGS:
        cells = ["runs" if refusal(cell(task, setting)) is None else "refused" for task in TASKS]
        lines.append(f"| `{setting}` | " + " | ".join(cells) + " |")
    lines += ["", "Settings that do not run together (any task), with the reason the check gives:", ""]
    for a, b in itertools.combinations(SETTINGS, 2):
        if SETTINGS[a].get("strategy", {}).get("name") and SETTINGS[b].get("strategy", {}).get("name"):
            continue  # one strategy at a time
        if a.startswith("robust.rule") and b.startswith("robust.rule") or a.startswith("compression") and b.startswith("compression"):
            continue
        why = refusal(cell("binary", a, b))
        if why is not None:
            lines.append(f"- `{a}` with `{b}`: {why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
