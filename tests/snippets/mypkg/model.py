"""A stand-in model: weights read once, in the template, shared by every worker."""
import numpy

MODEL = None  # set by load(): a template loads it once, its forks share the pages


def load(path):
    """Read float32 weights from ``path``; they also become ``mypkg.model.MODEL``."""
    global MODEL
    MODEL = numpy.fromfile(path, dtype=numpy.float32)
    return MODEL
