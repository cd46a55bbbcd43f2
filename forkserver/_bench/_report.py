"""The table, the goals and the JSON of ``python -m forkserver bench``."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import List, Optional

from . import _executor, _scenarios as S
from ._core import MIB, Contender, summary


def machine(preload: str) -> dict:
    """What the numbers were measured on: CPUs, Python, kernel, memory, load."""
    import psutil

    module = sys.modules.get(preload)
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / (1024 * MIB), 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "preload": preload,
        "preload_version": getattr(module, "__version__", None),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def rows(scenario: S.Scenario) -> List[dict]:
    """One dict per contender: numbers (None when it did not run), ratio, note."""
    base = summary(scenario.contenders[0].samples)
    out = []
    for c in scenario.contenders:
        stats = summary(c.samples)
        row = {"contender": c.name, "unit": scenario.unit, "n": 0, "median": None,
               "p90": None, "ratio": None, "note": c.note, "samples": c.samples}
        if stats is not None:
            row.update(stats)
            if base is not None:
                row["ratio"] = stats["median"] / base["median"]
        out.append(row)
    return out


def _median(scenarios: List[S.Scenario], key: str, name: str) -> Optional[float]:
    sc = next((s for s in scenarios if s.key == key), None)
    c: Optional[Contender] = None if sc is None else sc.get(name)
    stats = None if c is None else summary(c.samples)
    return None if stats is None else stats["median"]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


def goals(scenarios: List[S.Scenario], settings: S.Settings) -> List[dict]:
    """The goals of DESIGN.md ("Numbers to beat"), evaluated on this run's medians."""
    def m(key: str, name: str) -> Optional[float]:
        return _median(scenarios, key, name)

    gib = settings.parent_gib
    big_hint = None if gib >= 4 else "the goal is stated for 4 GiB: --parent-gib 4"
    exec_ran = any(sc.key == "exec" for sc in scenarios)
    return [
        _goal(f"start: forkserver >= 3x faster than {S.MP_FS}",
              _ratio(m("start", S.MP_FS), m("start", S.FS)), 3.0, "x", at_least=True),
        _goal(f"start: forkserver <= 1.3x {S.FORK_FLOOR}",
              _ratio(m("start", S.FS), m("start", S.FORK_FLOOR)), 1.3, "x"),
        _goal(f"back to back: forkserver >= 3x faster than {S.MP_FS}",
              _ratio(m("back_to_back", S.MP_FS), m("back_to_back", S.FS)), 3.0, "x",
              at_least=True),
        _goal(f"back to back: forkserver <= 1.3x {S.FORK_FLOOR}",
              _ratio(m("back_to_back", S.FS), m("back_to_back", S.FORK_FLOOR)), 1.3, "x"),
        _goal(f"big parent ({gib:g} GiB): forkserver <= 1.1x small parent",
              _ratio(m("big_parent", S.FS), m("big_parent", S.FS_SMALL)), 1.1, "x",
              hint=big_hint),
        _goal(f"exec {S.TRUE}: {S.FS_SPAWN} <= 1.5x {S.SUBPROCESS}",
              _ratio(m("exec", S.FS_SPAWN), m("exec", S.SUBPROCESS)), 1.5, "x",
              missing=f"{S.FS_SPAWN} not available yet" if exec_ran else None),
        _goal("idle forkserver worker USS <= 1.5 MiB", m("idle_uss", S.FS), 1.5, "MiB"),
        *_executor.goals(m, _ratio, _goal),
    ]


def _goal(text: str, value: Optional[float], limit: float, unit: str,
          at_least: bool = False, missing: Optional[str] = None,
          hint: Optional[str] = None) -> dict:
    met = None if value is None else (value >= limit if at_least else value <= limit)
    note = (missing or "not measured in this run") if value is None else hint
    return {"goal": text, "value": value, "limit": limit, "unit": unit, "met": met,
            "note": note}


def _num(value: Optional[float], unit: str) -> str:
    return "-" if value is None else f"{value:.2f} {unit}"


def table(scenarios: List[S.Scenario], info: dict, goal_list: List[dict]) -> str:
    """The human-readable report: machine, one table, footer, goals."""
    lines = [
        f"forkserver bench: {info['cpus']} CPUs ({info['cpu_model'] or 'unknown model'}), "
        f"{info['memory_gib']} GiB, {info['python']}, {info['kernel']}, "
        f"load {info['load_average_1min']}",
        f"preload {info['preload']} {info['preload_version'] or ''}".rstrip(),
        "",
        f"{'scenario / contender':<34}{'n':>5}{'median':>13}{'p90':>13}{'vs forkserver':>15}",
    ]
    for sc in scenarios:
        lines.append(sc.title)
        for row in rows(sc):
            lines.append(_row_line(row))
    lines += ["", "vs forkserver = contender median / forkserver median in the same scenario",
              "  (> 1: forkserver is faster or smaller). n = samples (USS: workers).",
              "Contenders of a scenario are interleaved round-robin after a warm-up."]
    lines += [f"{sc.key}: {note}" for sc in scenarios for note in sc.notes]
    lines += ["", 'goals (DESIGN.md "Numbers to beat"), computed from this run:']
    lines += [_goal_line(g) for g in goal_list]
    lines.append(f"  {'fd passing >= 100k fds/s':<58}{'-':>10}  not measured here "
                 "(python benchmarks/fdpass.py)")
    return "\n".join(lines)


def _row_line(row: dict) -> str:
    head = f"  {row['contender']:<32}"
    if row["median"] is None:
        return f"{head}{'-':>5}  {row['note'] or 'did not run'}"
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    return (f"{head}{row['n']:>5}{_num(row['median'], row['unit']):>13}"
            f"{_num(row['p90'], row['unit']):>13}{ratio:>15}")


def _goal_line(g: dict) -> str:
    if g["value"] is None:
        shown, verdict = "-", g["note"]
    else:
        shown, verdict = f"{g['value']:.2f} {g['unit']}", "met" if g["met"] else "MISSED"
        if g["note"]:
            verdict += f" ({g['note']})"
    return f"  {g['goal']:<58}{shown:>10}  {verdict}"


def to_json(scenarios: List[S.Scenario], info: dict, goal_list: List[dict],
            settings: S.Settings, seconds: float) -> dict:
    """Everything in the table, plus every sample, as one JSON-ready dict."""
    return {
        "machine": info,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "seconds": seconds,
        "scenarios": {sc.key: {"title": sc.title, "unit": sc.unit, "notes": sc.notes,
                               "contenders": rows(sc)} for sc in scenarios},
        "goals": goal_list,
    }
