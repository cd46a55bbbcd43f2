"""Worker code of the docs' snippets: reads the template's namespace like any module."""
from __future__ import annotations


def score(control, text):
    from forkserver.template import MODEL  # what the template's eval() loaded

    control.sendall(str(MODEL.score(text)).encode())
