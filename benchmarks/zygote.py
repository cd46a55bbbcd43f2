"""Script start through a zygote: ``forkserver run script.py`` against ``python script.py``.

The script imports the preload module (numpy when installed) and prints one
line.  Each sample is the wall time from spawning the command to reaping
it.  Contenders, interleaved round-robin in ONE run after a warm-up, against
a zygote started once beforehand in a private directory:

  forkserver run             the console script (site + the package's __init__ + the client)
  forkserver launcher (-IS)  the same client with a minimal start-up (``forkserver launcher``)
  python script.py           what the zygote replaces
  python -IS -c pass         the floor of any client written in Python

Then the client's own cost, three ways: its imports under ``-X importtime``
(launcher), launcher minus floor (everything the client and the zygote add
to an interpreter start), and the run's life inside the zygote -- fork to
reaped -- from the daemon's log.

Goal (issue 17): >= 10x faster than ``python script.py``.

Run:
    python benchmarks/zygote.py               # 20 runs each
    python benchmarks/zygote.py --runs 50 --preload json --json zygote.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys

from forkserver._bench import _core as B
from forkserver._bench._zygote import FLOOR, FS_LAUNCHER, FS_RUN, PYTHON, zygote_bench

GOAL = 10.0


def _import_cost(zb) -> dict:
    """Self time (ms) of each module the launcher imports beyond a bare ``python -IS``."""
    def imports(argv):
        out = subprocess.run([sys.executable, "-X", "importtime", *argv], env=zb.env,
                             capture_output=True, text=True, timeout=B.TIMEOUT).stderr
        found = {}
        for line in out.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+\d+ \| (.*)", line)
            if m:
                found[m.group(2).strip()] = int(m.group(1)) / 1e3
        return found

    base = imports(["-IS", "-c", "pass"])
    costs = []
    for _ in range(5):
        mine = imports(["-IS", zb.launcher, zb.script])
        costs.append({k: v for k, v in mine.items() if k not in base})
    names = costs[0]
    return {name: statistics.median(c.get(name, 0.0) for c in costs) for name in names}


def _in_zygote_ms(zb) -> list:
    """Fork-to-reaped times of the runs, from the daemon's log ("ended: c0 after X ms")."""
    times = []
    for name in os.listdir(zb.env["FORKSERVER_RUNTIME_DIR"]):
        if name.endswith(".log"):
            with open(os.path.join(zb.env["FORKSERVER_RUNTIME_DIR"], name)) as f:
                times += [float(x) for x in re.findall(r"ended: c0 after ([\d.]+) ms", f.read())]
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="samples per contender (20)")
    parser.add_argument("--preload", default="numpy" if importlib.util.find_spec("numpy")
                        else "json", help="the module the script imports (numpy if installed)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    with zygote_bench(args.preload) as zb:
        contenders = zb.contenders()
        if contenders[0].once is None:
            print(f"no `forkserver` console script next to {sys.executable}: pip install -e .")
            return 1
        B.measure(contenders, args.runs, warmup=3)
        imports = _import_cost(zb)
        inside = _in_zygote_ms(zb)
    med = {c.name: statistics.median(c.samples) for c in contenders}
    print(f"zygote benchmark: {os.cpu_count()} CPUs, {platform.python_implementation()} "
          f"{platform.python_version()}, {platform.system()} {platform.release()}, "
          f"load {os.getloadavg()[0]:.2f}; script: import {args.preload}, print one line")
    print(f"\n{'contender':<28}{'n':>4}{'median':>11}{'p90':>11}{'python / it':>13}")
    for c in contenders:
        s = B.summary(c.samples)
        print(f"  {c.name:<26}{s['n']:>4}{s['median']:>8.2f} ms{s['p90']:>8.2f} ms"
              f"{med[PYTHON] / s['median']:>12.2f}x")
    print("\nthe client's cost:")
    print(f"  imports under python -IS (launcher): {sum(imports.values()):.2f} ms "
          f"({', '.join(f'{k} {v:.2f}' for k, v in imports.items())})")
    print(f"  launcher - floor: {med[FS_LAUNCHER] - med[FLOOR]:.2f} ms (client imports, connect, "
          "the zygote's checks and fork, the run, its exit and report)")
    print(f"  console script - launcher: {med[FS_RUN] - med[FS_LAUNCHER]:.2f} ms (site, "
          "the pip wrapper's `import re`, forkserver/__init__)")
    if inside:
        print(f"  a run inside the zygote, fork to reaped: median {statistics.median(inside):.2f} ms "
              f"(n={len(inside)}, daemon log)")
    print("\ngoal: >= 10x faster than python script.py")
    for name in (FS_LAUNCHER, FS_RUN):
        ratio = med[PYTHON] / med[name]
        print(f"  {name:<26}{ratio:>6.2f}x  {'met' if ratio >= GOAL else 'MISSED'}")
    print(f"  (the floor, {FLOOR}, is {med[PYTHON] / med[FLOOR]:.2f}x: what a Python client "
          "could reach at best; beyond it, a native client)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians_ms": med, "samples": {c.name: c.samples for c in contenders},
                       "imports_ms": imports, "in_zygote_ms": inside, "preload": args.preload},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
