"""A stand-in for an ffmpeg-like program: progress lines ending in \\r on stderr, forever."""

import sys
import time

frame = 0
while True:
    frame += 25
    sys.stderr.write(f"frame={frame} fps=25.0 time=00:00:{frame // 25:02d}.00 speed=1.0x\r")
    sys.stderr.flush()
    time.sleep(0.1)
