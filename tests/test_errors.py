import pickle

import pytest

import forkserver
from forkserver import _errors


@pytest.mark.parametrize("name", _errors.__all__)
def test_every_error_survives_a_pickle_round_trip(name):
    cls = getattr(_errors, name)
    if name == "CalledProcessError":  # subprocess's signature: (returncode, cmd, output, stderr)
        err = cls(3, ["prog", "x"], b"out", b"err")
    else:
        err = cls("something broke on <x>; do y")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.args == err.args
    if cls is not _errors.RemoteTraceback:  # a carrier for __cause__, not an error of ours
        assert issubclass(cls, forkserver.ForkserverError)


def test_errors_are_reexported_from_the_package():
    for name in _errors.__all__:
        assert getattr(forkserver, name) is getattr(_errors, name)
        assert name in forkserver.__all__
