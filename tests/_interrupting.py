"""A module whose import (in a template) sends SIGINT to the test process, then takes a while.

``run("tests._interrupting:wait_for_eof")`` is thus interrupted (Ctrl-C, as
from a terminal) exactly while the template imports its target.
"""
import os
import signal
import time

os.kill(int(os.environ.get("FORKSERVER_TEST_PARENT", os.getppid())), signal.SIGINT)
time.sleep(0.3)  # the interrupt lands while the parent waits for the run's reply


def wait_for_eof(control):
    control.recv(1)
