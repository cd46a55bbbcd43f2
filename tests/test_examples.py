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
