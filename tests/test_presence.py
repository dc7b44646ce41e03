import pytest

from mossnode.protocols.presence import FailureDetector


def test_alive_suspect_dead() -> None:
    fd = FailureDetector(1000, 3000)
    assert fd.health("p", 0) == "dead"
    assert fd.heard("p", 0, ["/ip4/127.0.0.1/tcp/1"], {"load": 0.1}) is True
    assert fd.health("p", 999) == "alive"
    assert fd.health("p", 1000) == "suspect"
    assert fd.health("p", 3000) == "dead"
    assert fd.heard("p", 500, [], {}) is False  # still alive: not a comeback
    assert fd.heard("p", 5000, [], {}) is True
    fd.forget("p")
    assert fd.health("p", 5000) == "dead"


def test_thresholds_checked() -> None:
    with pytest.raises(ValueError):
        FailureDetector(3000, 1000)
