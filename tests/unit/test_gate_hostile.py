"""Hostile input corpus for the gate: generated cases and a property.

Every refusal must be a UserError (prologue exit 1) with a one-line message;
nothing but an exact allowlisted path, as text, may ever pass.
"""
import itertools
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbs_chroot import config, gate
from pbs_chroot.errors import UserError
from pbs_chroot.jobinfo import lossy_names, parse_variable_list

ALLOWED = ("/chroot/sl5", "/chroot/el7", "/cvmfs/sft.cern.ch/os/el9")
CFG = config.parse("".join(f"[image {p}]\n" for p in ALLOWED))


def escape(text: str) -> str:
    """Torque's Variable_List escaping (encode_arst): backslash before , \" ' \\ newline."""
    return "".join("\\" + c if c in "\"',\\\n" else c for c in text)


def decide(pairs: list) -> Optional[str]:
    raw = ",".join(f"{escape(n)}={escape(v)}" for n, v in pairs)
    img = gate.check_request(parse_variable_list(raw), lossy_names(raw), CFG, "root", "batch")
    return None if img is None else img.path


def _values() -> list:
    out = []
    for p in ALLOWED:
        parts = p.split("/")
        out += [p + "/", p + "//", p + "/.", p + "/..", p + "/../" + parts[-1], "/" + p,
                p.replace("/", "//"), p.replace("/", "/./"), p + " ", " " + p, p + "\n",
                p + "\x00", p + "\t", p.upper(), p[:-1], p + "x", p + "/x", p + "\\",
                p.replace("/", "\\/"), p[1:], "./" + p[1:], "../" + p[1:], p + ",x",
                p + "=", p + "'", p + '"', p + "$(id)", p + "`id`", p + ";id", p + "|id",
                p + "\udcff", p + "\u202e", p.replace("c", "\u0441"), p + "\r", "~" + p,
                p + "/" + "a" * 4096]
        comps = p.split("/")[1:]
        for i in range(len(comps) + 1):  # at every level of a path that looks allowed
            for insert in ("..", ".", ""):
                out.append("/" + "/".join(comps[:i] + [insert] + comps[i:]))
        out += [p + c for c in " \t\x0b\x0c\x1b\x7f;&|<>*?[]{}#!%"]
    out += ["", "/", "//", ".", "..", "/tmp/x", "/tmp", "sl5", "relname", "/" + "x" * 65536,
            "/home/user/myimage", "/proc/self/root", "/proc/1/root", "/dev/shm/x"]
    return out


HOSTILE_VALUES = sorted(set(_values()) - set(ALLOWED))
NAMES = ["PBS_O_ROOTDIRX", "PBS_O_ROOTDIR_", "PBS_O_ROOTDIR2", "PBS_O_ROOTDIR ", "PBS_O_ROOTDIR\n"]


def test_corpus_is_large() -> None:
    assert len(HOSTILE_VALUES) + len(NAMES) * len(ALLOWED) >= 200


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_values_are_refused(value: str) -> None:
    with pytest.raises(UserError) as exc:
        decide([("PBS_O_HOME", "/home/u"), ("PBS_O_ROOTDIR", value), ("X", "1")])
    assert "\n" not in exc.value.user_msg and "\x00" not in exc.value.user_msg
    assert len(exc.value.user_msg) < 500
    assert exc.value.user_msg.endswith("allowed: " + ", ".join(ALLOWED))


@pytest.mark.parametrize("name, path", list(itertools.product(NAMES, ALLOWED)))
def test_prefix_names_are_refused_even_with_an_allowed_path(name: str, path: str) -> None:
    with pytest.raises(UserError):
        decide([("PBS_O_ROOTDIR", path), (name, path)])
    with pytest.raises(UserError):
        decide([(name, path)])


@pytest.mark.parametrize("path", ALLOWED)
def test_hidden_and_duplicate_entries(path: str) -> None:
    assert decide([("PBS_O_ROOTDIR", path), ("PBS_O_ROOTDIR", path)]) == path
    for other in ("/tmp/x", path + "/", ALLOWED[0] if path != ALLOWED[0] else ALLOWED[1]):
        with pytest.raises(UserError, match="different values"):
            decide([("PBS_O_ROOTDIR", path), ("PBS_O_ROOTDIR", other)])
        with pytest.raises(UserError, match="different values"):
            decide([("PBS_O_ROOTDIR", other), ("PBS_O_ROOTDIR", path)])
    with pytest.raises(UserError, match="inside the value"):
        decide([("FOO", f"a,PBS_O_ROOTDIR={path}")])
    with pytest.raises(UserError, match="inside the value"):
        decide([("PBS_O_ROOTDIR", path), ("FOO", "a,PBS_O_ROOTDIR=/tmp/x")])


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.sampled_from(HOSTILE_VALUES),
                 st.builds(lambda p, s: p + s, st.sampled_from(ALLOWED), st.text(max_size=8)),
                 st.builds(lambda s, p: s + p, st.text(max_size=8), st.sampled_from(ALLOWED))))
def test_only_exact_allowlisted_text_passes(value: str) -> None:
    """Property: for any value, the gate allows it only if it equals an allowlisted path."""
    try:
        got = decide([("PBS_O_ROOTDIR", value)])
    except UserError:
        assert value not in ALLOWED
        return
    assert got == value and value in ALLOWED


@settings(max_examples=500)
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=6))
def test_no_variable_list_crashes_the_gate(pairs: list) -> None:
    """Whatever the variables, the gate answers: an image, none, or a UserError."""
    try:
        got = decide(pairs)
    except UserError:
        return
    assert got is None or got in ALLOWED
