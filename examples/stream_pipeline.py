"""Compress a generated file through gzip and back, with forkserver.stream.

    python examples/stream_pipeline.py [--mib 64]

Writes a file of log-like lines, then streams it through ``gzip -c`` into a
compressed file, then through ``gzip -dc`` -- fed by a second stream,
``cat`` of the compressed file, so one stream is the other's input -- and
checks that what comes back is byte for byte what went in.  At no point is
more than a few chunks in memory: every stream reads only when its consumer
asks (back-pressure), so the same code handles files far bigger than RAM.
Prints the sizes, the throughput and the peak memory growth; exits 1 if the
round trip does not match.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import sys
import tempfile
import time

import forkserver

MIB = 1 << 20


def write_log(path: str, mib: int) -> str:
    """A file of ``mib`` MiB of log-like lines; returns its sha256."""
    rng = random.Random(5)
    words = ["GET", "POST", "/api/items", "/login", "200", "404", "500", "user", "cache", "miss"]
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written = 0
        while written < mib * MIB:
            stamp = 1700000000 + written // 97
            lines = "".join(
                f"{stamp + i} {' '.join(rng.choices(words, k=6))} {rng.random():.6f}\n"
                for i in range(1000)
            ).encode()
            f.write(lines)
            digest.update(lines)
            written += len(lines)
    return digest.hexdigest()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mib", type=int, default=64, help="size of the generated file (default 64)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        plain, packed = os.path.join(tmp, "app.log"), os.path.join(tmp, "app.log.gz")
        expected = write_log(plain, args.mib)
        size = os.path.getsize(plain)
        rss0 = peak_rss_mib()

        t0 = time.perf_counter()
        with open(plain, "rb") as src, open(packed, "wb") as dst:
            for chunk in forkserver.stream(
                ["gzip", "-c"], input=src
            ):  # stdin closes at EOF: gzip flushes
                dst.write(chunk)
        t1 = time.perf_counter()

        got = hashlib.sha256()
        back = 0
        compressed = forkserver.stream(["cat", packed])  # one stream feeds the other
        with forkserver.stream(["gzip", "-dc"], input=compressed, stderr="pipe") as unpacked:
            for chunk in unpacked:
                got.update(chunk)
                back += len(chunk)
        t2 = time.perf_counter()

        print(
            f"generated {size / MIB:.1f} MiB -> gzip {os.path.getsize(packed) / MIB:.1f} MiB "
            f"({size / MIB / (t1 - t0):.0f} MiB/s) -> back {back / MIB:.1f} MiB "
            f"({back / MIB / (t2 - t1):.0f} MiB/s)"
        )
        print(f"peak memory growth while streaming: {peak_rss_mib() - rss0:.1f} MiB")
        ok = got.hexdigest() == expected and back == size
        print("round trip:", "identical" if ok else "MISMATCH")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
