"""``python -m forkserver bench``: every scenario measured, JSON complete, nothing left behind.

These tests never assert speed: the numbers depend on the machine.
"""
from __future__ import annotations

import json

import pytest

import forkserver
from forkserver.__main__ import main

EXPECTED = {
    "start": {"forkserver", "mp forkserver + preload", "mp spawn", "os.fork, small process"},
    "back_to_back": {"forkserver", "forkserver, spare=False", "mp forkserver + preload",
                     "os.fork, small process"},
    "big_parent": {"forkserver", "forkserver, small parent", "os.fork, this process"},
    "exec": {"forkserver.spawn", "subprocess.run", "os.posix_spawn + waitpid"},
    "idle_uss": {"forkserver", "mp forkserver + preload", "mp spawn"},
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
    if row["median"] is None:  # allowed only for forkserver.spawn, until it lands
        assert (scenario, row["contender"]) == ("exec", "forkserver.spawn"), row
        assert not hasattr(forkserver, "spawn") and "not available yet" in row["note"]
        assert row["n"] == 0 and row["samples"] == [] and row["ratio"] is None
        return
    assert row["n"] == len(row["samples"]) > 0, row["contender"]
    assert all(s > 0 for s in row["samples"]), row["contender"]
    assert row["median"] > 0 and row["p90"] > 0
    if scenario != "exec" or hasattr(forkserver, "spawn"):
        assert row["ratio"] > 0


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
    # start x2, back to back x2, big parent, exec, USS; executor: round trip, map, first x2
    assert len(data["goals"]) == 11 and all("met" in g for g in data["goals"])
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
