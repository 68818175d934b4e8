"""The project's samples of the Torque 6.1 captures stay equal to the captures.

The captures (../shared beside the repo) are the authority, and CI has them;
the samples let a clone alone run every check that reads them (tests/captures.py).
"""
import pytest

from tests.captures import CAPTURES, SAMPLES


def sample_names() -> list:
    return sorted(str(p.relative_to(SAMPLES)) for p in SAMPLES.rglob("*")
                  if p.is_file() and p.name != "README.md")


def test_there_are_samples() -> None:
    assert len(sample_names()) >= 40


@pytest.mark.parametrize("name", sample_names())
def test_sample_is_the_capture(name: str) -> None:
    if not CAPTURES.is_dir():
        # A clone alone: nothing to compare with (the samples are then all there is).
        assert (SAMPLES / name).stat().st_size > 0
        return
    assert (SAMPLES / name).read_bytes() == (CAPTURES / name).read_bytes()
