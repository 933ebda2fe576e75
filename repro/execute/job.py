"""What a cluster job executes: one run, through ``repro run --run-id`` in a child process.

This module is what submitit unpickles in the job, so it imports nothing heavy: the child imports torch.
"""

from __future__ import annotations

import datetime
import os
import shlex
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any


def _ignore_preemption_signal() -> None:
    """In the job's child process: the job's own process handles Slurm's USR2 (checkpoint and requeue)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class RunJob:
    """What a job executes: one ``repro run --run-id`` command, output appended to the run's log.

    submitit calls ``checkpoint`` on preemption or time-out and requeues what it returns: the same command.
    """

    def __init__(self, command: list[str], log: Path) -> None:
        self.command, self.log = command, log

    def __call__(self) -> int:
        import submitit

        job_id = submitit.JobEnvironment().job_id
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "REPRO_JOB_ID": str(job_id), "REPRO_JOB_LOG": str(self.log), "PYTHONUNBUFFERED": "1"}
        with self.log.open("a") as out:
            started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            out.write(f"== job {job_id} on {socket.gethostname()} at {started}: {shlex.join(self.command)}\n")
            out.flush()
            code = subprocess.run(self.command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False,
                                  preexec_fn=_ignore_preemption_signal).returncode
        if code != 0:
            raise RuntimeError(f"repro run exited with status {code}; see {self.log}")
        return code

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)
