"""A stand-in for an expensive model: ``load(path)`` returns something workers use."""
from __future__ import annotations

GOOD = {"good", "great", "fine", "happy"}


class Model:
    def __init__(self, path: str) -> None:
        self.path = path

    def score(self, text: str) -> int:
        """+1 per good word: enough to show the worker used the template's model."""
        return sum(word in GOOD for word in text.lower().split())


def load(path: str) -> Model:
    return Model(path)
