"""Tasks: what a study predicts. `build_task` gives the task a config names (see tasks/base.py)."""

from __future__ import annotations

from fedward.components import load_component
from fedward.config import TaskConfig
from fedward.errors import ConfigError
from fedward.tasks.base import Task
from fedward.tasks.binary import Binary
from fedward.tasks.multiclass import Multiclass
from fedward.tasks.regression import Regression

TASKS: dict[str, type[Task]] = {"binary": Binary, "multiclass": Multiclass, "regression": Regression}


def build_task(config: TaskConfig, study_dir: str | None = None) -> Task:
    """The task of `task.kind`, or the study's own `task.target` (a `Task` subclass taking the
    TaskConfig, whose `args` it reads)."""
    if config.target is None:
        return TASKS[config.kind](config)
    made = load_component(config.target, "task.target", study_dir)
    if not (isinstance(made, type) and issubclass(made, Task)):
        raise ConfigError(f"task.target: {config.target!r} is not a subclass of fedward.tasks.Task")
    task = made(config)
    if not (isinstance(task.output_size, int) and task.output_size >= 1):
        raise ConfigError(f"task.target: {config.target!r} gives output_size {task.output_size!r}; expected a whole number >= 1")
    return task


def binary_task() -> Task:
    return Binary(TaskConfig())


__all__ = ["TASKS", "Task", "binary_task", "build_task"]
