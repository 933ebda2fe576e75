"""Tasks: what a run computes (``train``, ``tta``, ``quantize``, ``memory``), one module and one ``@register_task``
each. Suites (repro.suite) are data; executors (repro.execute) place the runs."""

from repro.tasks import memory, quantize, train, tta  # noqa: F401  (registration side effect)
from repro.tasks.base import TASKS, RunContext, RunOutcome, RunSpec, Task, register_task

__all__ = ["TASKS", "RunContext", "RunOutcome", "RunSpec", "Task", "register_task"]
