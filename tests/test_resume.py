"""A build stopped with `kill -9` or Ctrl-C resumes without repeating a finished model call.

Orchestration only, so the scripted engine answers (slowly, so that the build can be stopped
halfway); the real engines' own stop and restart tests are in tests/backends/."""
import os
import signal
import subprocess
import sys
import time

import pytest

from builder.build import run_build
from builder.compile import split_path
from builder.workspace import Workspace

from .conftest import write_workspace

PASSAGES = [f"Report {i}: the mayor of Town {i} claims crime fell by {10 + i} percent after new lights." for i in range(6)]


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_stopped_build_resumes_from_the_cache(tmp_path, how):
    root = write_workspace(tmp_path / "ws", PASSAGES, annotate={"retries": 0},
                           annotator={"backend": "scripted", "model": "bundled:smollm2", "delay_s": 0.3})
    log = root / "logs" / "build-gen-0001.log"
    # SIGINT at its default in the child: a suite started from a background job inherits it ignored.
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "build", "--workspace", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    finished_calls = 0
    while time.time() < deadline and proc.poll() is None:
        finished_calls = log.read_text().count(" call ") if log.exists() else 0
        if finished_calls >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the build finished before it could be stopped"
    os.kill(proc.pid, signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert finished_calls >= 2
    if how == "Ctrl-C":
        assert proc.returncode == 130
        assert "every finished model call is saved" in " ".join(stderr.split())

    summary = run_build(Workspace(root))  # the kernel released the lock with the process
    assert summary["cached_calls"] >= finished_calls
    audits = summary["audit"]["attempts"]  # the sample depends on the workspace's random secret
    panel = summary["ratchet"]["panel_attempts"]  # the ratchet panel scores every kept reflection
    calibration = summary["calibration"]["attempts"]  # each judging task's two content-free inputs
    every = len(PASSAGES) + audits + panel + calibration
    assert summary["cached_calls"] + summary["model_calls"] == every
    assert summary["model_calls"] <= every - finished_calls
    assert split_path(root / "generations" / "gen-0001", "sft").exists()
    assert not list((root / "generations").glob(".gen-*"))  # no half-written generation left behind
    con = Workspace(root).connect(read_only=True)
    statuses = [r[0] for r in con.execute("SELECT status FROM builds ORDER BY started_at").fetchall()]
    assert statuses == ["interrupted", "finished"]  # a killed build is found out by the next one
