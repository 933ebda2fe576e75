"""``repro.process``: every repro command and worker keeps freed memory for reuse (glibc's malloc)."""

import multiprocessing
import platform

import pytest

import repro.cli
import repro.execute.local
from repro.process import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_settings() -> None:
    assert keep_freed_memory() is True


@pytest.mark.parametrize("entry", ["cli", "worker"])
def test_commands_and_workers_set_it_first(entry: str, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    calls = []
    module = repro.cli if entry == "cli" else repro.execute.local
    monkeypatch.setattr(module, "keep_freed_memory", lambda: calls.append(entry) or True)
    if entry == "cli":
        assert repro.cli.main(["list"]) == 0
    else:
        counter = multiprocessing.get_context("spawn").Value("i", 0)
        monkeypatch.setattr(repro.execute.local.torch, "set_num_threads", lambda threads: None)
        repro.execute.local._start_worker(counter, [], 1)
    assert calls == [entry]
