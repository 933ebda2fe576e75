"""Executors: where a suite's runs execute (this process, local worker processes, Slurm jobs through submitit).

A run is the unit of work. Whoever runs it writes its record (``repro.suite.runner.RunRecorder``), so run ids
and records do not depend on the executor.
"""
