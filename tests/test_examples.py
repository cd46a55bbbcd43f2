"""The examples in examples/ run and do what their docstrings say."""
from __future__ import annotations

import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_prefork_server_example_serves_every_request_from_its_workers():
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "prefork_server.py"), "--workers", "3", "--requests", "12"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    pids = lines[0].split(": ")[1].split()
    answers = [line for line in lines if line.startswith("hello from worker")]
    assert len(pids) == 3 and len(answers) == 12
    assert {a.split("(pid ")[1].rstrip(")") for a in answers} <= set(pids)
    assert lines[-1].endswith("exit codes: [0, 0, 0]")


def test_stream_pipeline_example_round_trips_a_file_through_gzip():
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "stream_pipeline.py"), "--mib", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("round trip: identical")


def test_executor_numpy_example_fails_only_the_killed_task_and_gets_every_result():
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "executor_numpy.py"), "--tasks", "50", "--size", "50"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("first result after")
    assert any(line.startswith("one task failed alone: worker") and "SIGKILL" in line for line in lines)
    assert "progress events: [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]" in lines
    assert lines[-1] == "50 results, the same as computed here: True"
