"""Suites: pinned YAML files that expand into runs (the runner that executes them is repro.execute.runner)."""

from repro.suite.expand import expand
from repro.suite.load import list_suite_files, load_suite, resolve_suite_path
from repro.suite.schema import Suite
from repro.tasks import TASKS, RunContext, RunOutcome, RunSpec, Task, register_task

__all__ = [
    "TASKS",
    "RunContext",
    "RunOutcome",
    "RunSpec",
    "Suite",
    "Task",
    "expand",
    "list_suite_files",
    "load_suite",
    "register_task",
    "resolve_suite_path",
]
