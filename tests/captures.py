"""The Torque 6.1 captures, and the project's own samples of them, for tests to read.

The real captures (../shared/fixtures/torque-6.1, beside the repo) are the
authority: CI has them. A clone of the project alone has only the samples in
tests/samples/torque-6.1 (copies of the captures the tests read, kept equal to
them by test_captures.py whenever both are there). Tests read a file through
``torque_file(source, name)`` and are parametrized over ``SOURCES`` (the
``torque_source`` fixture), so every check runs against the captures when they
are present and against the samples always: nothing is skipped for a missing
fixture.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO.parent / "shared" / "fixtures" / "torque-6.1"
SAMPLES = REPO / "tests" / "samples" / "torque-6.1"
SOURCES = ([("capture", CAPTURES)] if CAPTURES.is_dir() else []) + [("sample", SAMPLES)]


def torque_file(source: Path, name: str) -> Path:
    """``name`` (relative to torque-6.1/) in ``source``; a missing one fails, never skips."""
    path = source / name
    assert path.exists(), f"{name} missing from {source}"
    return path
