"""fedward: federated learning across hospitals, on Ray.

The project's folders (pipelines/, actors/, explain/, data_adapters/, models/, privacy/) sit beside
this one, as its layout asks, and are imported as fedward.pipelines, fedward.actors, ...: installed,
packaging maps them there; run from a source tree (a checkout, or the copy of the project a Ray job
ships) this package's path also holds the project's top folder. fedward then takes no top-level
name but its own, and a study's own `models` or `pipelines` package imports as the study's.
"""

from pathlib import Path

_PROJECT = Path(__file__).resolve().parent.parent
if (_PROJECT / "pyproject.toml").is_file() and (_PROJECT / "pipelines" / "cli.py").is_file():
    __path__.append(str(_PROJECT))
