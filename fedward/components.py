"""Components named by `"package.module:name"`: a study's own model factory, task or strategy.

A name is imported where the component runs (the driver, every hospital), from an installed package
or from the study folder: the folder `fedward simulate` started in, which the driver passes on as
`run.study_dir`. Nothing named here is ever sent as code: every process imports it by name.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from fedward.errors import ConfigError


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
    return obj


def source_file(obj: Any) -> Path | None:
    """The file a component was defined in, for the model card's record of the study code."""
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    file = getattr(module, "__file__", None)
    return Path(file) if file else None
