"""Where and when runs execute: executors (this process, local worker processes, Slurm jobs through submitit),
time estimates, budgeted campaigns, archives of results, and bundles for bare GPU boxes.

A run is the unit of work. Whoever runs it writes its record (``repro.execute.runner.RunRecorder``), so run ids
and records do not depend on the executor.
"""

from repro.execute.local import run_suite

__all__ = ["run_suite"]
