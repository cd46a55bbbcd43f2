"""Records the thread-pool variables it sees at import time."""
import os

from forkserver._protocol import THREAD_LIMIT_VARS

SEEN = {name: os.environ.get(name) for name in THREAD_LIMIT_VARS}
