"""Components named by `"package.module:name"`: a study's own model factory, task or strategy.

A name is imported where the component runs (the driver, every hospital), from an installed package
or from the study folder: the folder `fedward simulate` started in, which the driver passes on as
`run.study_dir`. Nothing named here is ever sent as code: every process imports it by name.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import sysconfig
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from fedward.config import FedwardConfig
from fedward.errors import ConfigError


# What each component this process imported came from, taken when it was imported: the code that
# runs here, even if its file is edited afterwards.
_IMPORTED: dict[str, dict[str, Any]] = {}


def load_component(target: str, setting: str, study_dir: str | None = None) -> Any:
    """The object `target` names; `setting` is the config field that named it, for messages."""
    module_name, sep, attribute = target.partition(":")
    if not (sep and module_name and attribute):
        raise ConfigError(f"{setting}: expected 'package.module:name', got {target!r}")
    if study_dir and study_dir not in sys.path:
        sys.path.insert(0, study_dir)  # the study folder, as `python -m` in it would see it
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        where = f" or in the study folder {study_dir}" if study_dir else ""
        raise ConfigError(f"{setting}: cannot import {module_name!r} (from {target!r}): {e}. Install it{where}") from None
    except Exception as e:  # the study's own module failed while importing: its error, named as such
        raise ConfigError(f"{setting}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    try:
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"{setting}: {module_name!r} ({getattr(module, '__file__', '?')}) has no {attribute!r}") from None
    if target not in _IMPORTED:
        _IMPORTED[target] = _provenance(target, obj, study_dir)
    return obj


def build_versions(config: FedwardConfig, study_dir: str | None) -> dict[str, Any]:
    """What a model is built with: fedward's and torch's versions, and where the study's own
    components come from (a file's sha256 or a package's version). Hospitals report theirs before
    round 1 and the driver compares them with its own."""
    versions: dict[str, Any] = {name: _version(name) for name in ("fedward", "torch")}
    for setting, target in (("model.target", config.model.target), ("task.target", config.task.target), ("strategy.target", config.strategy.target)):
        if target is not None:
            versions[setting] = provenance(target, setting, study_dir)
    return versions


@cache
def _installed() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # reads every installed package's file list: once a process


def distributions_of(top: str) -> list[str]:
    """The installed distributions providing the top-level module `top`."""
    return _installed().get(top, [])


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance(target: str, setting: str, study_dir: str | None = None) -> dict[str, Any]:
    """Where the code `target` names comes from, as this process imported it (`_provenance`)."""
    load_component(target, setting, study_dir)
    return _IMPORTED[target]


def _provenance(target: str, obj: Any, study_dir: str | None) -> dict[str, Any]:
    """Where a component's code comes from, as a hospital or `predict` can check it without
    trusting anyone's word: the study's own file and its sha256, or an installed package's name and
    version. Two processes that built a model from the same provenance ran the same code."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    file = Path(module.__file__).resolve() if module is not None and getattr(module, "__file__", None) else None
    study = Path(study_dir).resolve() if study_dir else None
    top = (getattr(obj, "__module__", "") or target).split(".")[0]
    packages = distributions_of(top)
    installed = file is None or any(file.is_relative_to(Path(p).resolve()) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    if packages and installed:
        return {"target": target, "package": packages[0], "version": metadata.version(packages[0])}
    if file is not None and study is not None and file.is_relative_to(study):
        return {"target": target, "file": file.relative_to(study).as_posix(), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    if packages:  # installed in development mode, outside the study folder
        return {"target": target, "package": packages[0], "version": metadata.version(packages[0])}
    if file is not None:  # on sys.path but neither in the study folder nor installed: its file, by content
        return {"target": target, "file": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    return {"target": target}
