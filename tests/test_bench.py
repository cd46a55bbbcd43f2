"""``python -m forkserver bench``: every scenario measured, JSON complete, nothing left behind.

These tests never assert speed: the numbers depend on the machine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from forkserver.__main__ import main

EXPECTED = {
    "start": {"forkserver", "mp forkserver + preload", "mp spawn", "os.fork, small process"},
    "back_to_back": {"forkserver", "forkserver, spare=False", "mp forkserver + preload",
                     "os.fork, small process"},
    "big_parent": {"forkserver", "forkserver, small parent", "os.fork, this process"},
    "exec": {"forkserver.spawn", "subprocess.run", "os.posix_spawn + waitpid"},
    "idle_uss": {"forkserver", "mp forkserver + preload", "mp spawn"},
    "start_ran": {"forkserver", "mp forkserver + preload", "os.fork, small process"},
    "first_reply": {"forkserver Template()", "a fork() of a ready template", "Template.new_exec()"},
    "zygote": {"forkserver run", "forkserver launcher (-IS)", "python script.py",
               "python -IS -c pass"},
    "supervise": {"forkserver.Supervisor", "gunicorn arbiter (sync)"},
    "mp_start": {"mp_context()", "mp forkserver + preload", "mp fork", "mp spawn",
                 "mp_context(), 10 back to back", "mp forkserver + preload, 10 back to back"},
    "mp_big_parent": {"mp_context()", "mp_context(), small parent", "mp forkserver + preload",
                      "mp fork"},
    "mp_pool": {"mp_context()", "mp forkserver + preload", "mp fork"},
    "executor_rt": {"forkserver.Executor", "PPE, forkserver context", "PPE, fork context", "loky"},
    "executor_map": {"forkserver.Executor", "PPE, forkserver context", "PPE, fork context", "loky"},
    "executor_first": {"forkserver.Executor", "PPE, forkserver context", "PPE, fork context", "loky",
                       "forkserver.Executor, big parent", "PPE fork, big parent"},
}


def _loky_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("loky") is None


def _check_row(scenario: str, row: dict) -> None:
    if row["median"] is None and row["contender"] == "loky":  # the bench extra is optional
        assert _loky_missing() and "not installed" in row["note"], row
        return
    if row["median"] is None and (scenario, row["contender"]) == ("supervise", "gunicorn arbiter (sync)"):
        assert importlib.util.find_spec("gunicorn") is None and "not installed" in row["note"]
        return  # gunicorn is optional: pip install 'forkserver[bench]'
    assert row["n"] == len(row["samples"]) > 0, row
    assert all(s > 0 for s in row["samples"]), row["contender"]
    assert row["median"] > 0 and row["p90"] > 0 and row["ratio"] > 0


def test_bench_quick_writes_every_scenario_with_positive_numbers(tmp_path, capsys, no_leaks):
    path = tmp_path / "b.json"
    assert main(["bench", "--quick", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert set(data["scenarios"]) == set(EXPECTED)
    for key, scenario in data["scenarios"].items():
        assert {row["contender"] for row in scenario["contenders"]} == EXPECTED[key]
        for row in scenario["contenders"]:
            _check_row(key, row)
    assert data["machine"]["cpus"] > 0 and data["machine"]["kernel"]
    # start x2, back to back x2, big parent, exec, USS, start -> ran, first reply, zygote, restart;
    # mp context: start, big parent, pool; executor: round trip, map, first x2
    assert len(data["goals"]) == 18 and all("met" in g for g in data["goals"])
    unmeasured = [g for g in data["goals"] if g["value"] is None]
    if importlib.util.find_spec("gunicorn") is None:  # optional: its goal has no value then
        unmeasured = [g for g in unmeasured if "gunicorn" not in g["goal"]]
    assert not unmeasured, unmeasured
    out, err = capsys.readouterr()
    assert "vs forkserver" in out and "goals" in out
    assert f"bench [1/{1 + len(EXPECTED)}]" in err  # the progress lines


def test_bench_refuses_a_preload_module_that_does_not_exist(capsys, no_leaks):
    assert main(["bench", "--quick", "--preload", "no_such_module_for_bench"]) == 2
    assert "no_such_module_for_bench" in capsys.readouterr().err


def test_bench_rejects_an_unknown_scenario():
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "start,warp_speed"])
    assert exc.value.code == 2


QUICK = ["bench", "--quick", "--rounds", "3", "--spawn-samples", "0"]


def test_a_preload_module_only_the_current_directory_has_reaches_every_helper(
    tmp_path, monkeypatch, capsys, no_leaks
):
    (tmp_path / "only_here_mod.py").write_text("VALUE = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as python -m puts the cwd on sys.path
    path = tmp_path / "b.json"
    argv = QUICK + ["--preload", "only_here_mod", "--only", "start,start_ran,big_parent",
                    "--parent-gib", "0.01", "--json", str(path)]
    assert main(argv) == 0
    data = json.loads(path.read_text())
    for key in ("start", "start_ran", "big_parent"):
        for row in data["scenarios"][key]["contenders"]:
            _check_row(key, row)


def test_a_failing_helper_is_reported_by_name_and_the_json_is_still_written(
    tmp_path, monkeypatch, capsys, no_leaks
):
    # importable here and in templates, but not in the timing helpers (a script run)
    (tmp_path / "not_in_helpers.py").write_text(
        "import sys\n"
        "if sys.argv[0].endswith('_workers.py'):\n"
        "    raise ImportError('this module refuses timing helpers')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "b.json"
    argv = QUICK + ["--preload", "not_in_helpers", "--only", "start", "--json", str(path)]
    assert main(argv) == 0  # a measurement: what ran is reported
    data = json.loads(path.read_text())
    rows = {row["contender"]: row for row in data["scenarios"]["start"]["contenders"]}
    floor = rows["os.fork, small process"]
    assert floor["samples"] == [] and floor["median"] is None
    assert "timing helper 'fork' exited with status 1" in floor["note"]
    assert "this module refuses timing helpers" in floor["note"]
    assert rows["forkserver"]["n"] > 0  # the others ran
    goal = next(g for g in data["goals"] if g["goal"].startswith("start: forkserver <= "))
    assert goal["met"] is None and "os.fork, small process failed" in goal["note"]
    err = capsys.readouterr().err
    assert "this module refuses timing helpers" in err
    assert main(argv + ["--check"]) == 1  # --check: a contender that failed fails the run


def test_check_exits_1_only_when_a_goal_is_missed(monkeypatch, capsys, no_leaks):
    from forkserver._bench import _latency

    argv = QUICK + ["--only", "start_ran"]
    monkeypatch.setattr(_latency, "RAN_LIMIT_MS", 0.0)  # no start can take 0 ms: missed
    assert main(argv) == 0  # the default: a measurement
    assert main(argv + ["--check"]) == 1
    assert "start -> ran: forkserver <= 0 ms" in capsys.readouterr().err
    monkeypatch.setattr(_latency, "RAN_LIMIT_MS", 1e9)  # no start takes that long: met
    assert main(argv + ["--check"]) == 0


def test_python_m_forkserver_without_a_command_prints_the_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m forkserver") and "bench" in out
    done = subprocess.run([sys.executable, "-m", "forkserver"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0 and "bench" in done.stdout and not done.stderr
