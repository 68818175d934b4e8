"""The gate: every PBS_O_ROOTDIR* variable, compared as text with the allowlist."""
from typing import Optional

import pytest

from pbs_chroot import config, gate
from pbs_chroot.errors import UserError
from pbs_chroot.jobinfo import lossy_names, parse_variable_list

CFG = config.parse("[image /chroot/sl5]\n[image /chroot/el7]\nqueues = long\n"
                   "[image /chroot/root-only]\nusers = root\n")


def decide(raw: str, user: str = "root", queue: str = "batch") -> Optional[str]:
    img = gate.check_request(parse_variable_list(raw), lossy_names(raw), CFG, user, queue)
    return None if img is None else img.path


def test_no_request_is_untouched() -> None:
    assert decide("PBS_O_HOME=/home/u,MYVAR=a\\,b=") is None
    assert decide("") is None


def test_allowed_request() -> None:
    assert decide("PBS_O_HOME=/home/u,PBS_O_ROOTDIR=/chroot/sl5,X=1") == "/chroot/sl5"
    # Duplicates that agree are fine.
    assert decide("PBS_O_ROOTDIR=/chroot/sl5,PBS_O_ROOTDIR=/chroot/sl5") == "/chroot/sl5"


@pytest.mark.parametrize("raw, words", [
    ("PBS_O_ROOTDIR=/tmp/x", "not an image of this site; allowed: /chroot/sl5"),
    ("PBS_O_ROOTDIR=sl5", "not an absolute path; allowed: /chroot/sl5"),
    ("PBS_O_ROOTDIR=/chroot/sl5/", "not an image of this site"),
    ("PBS_O_ROOTDIR=/chroot/sl5/..", "'..' is not allowed"),
    ("PBS_O_ROOTDIR=/chroot/sl5/../sl5", "'..' is not allowed"),
    ("PBS_O_ROOTDIR=/chroot/./sl5", "not an image of this site"),
    ("PBS_O_ROOTDIR=//chroot/sl5", "not an image of this site"),
    ("PBS_O_ROOTDIR=sl5", "not an absolute path"),
    ("PBS_O_ROOTDIR=", "empty"),
    ("PBS_O_ROOTDIR=/chroot/sl5\n", "control character"),
    ("PBS_O_ROOTDIR=/chroot/sl5\x00", "control character"),
    ("PBS_O_ROOTDIRX=/tmp/x", "PBS_O_ROOTDIRX is not allowed"),
    ("PBS_O_ROOTDIRX=/chroot/sl5", "PBS_O_ROOTDIRX is not allowed"),
    ("PBS_O_ROOTDIR=/chroot/sl5,PBS_O_ROOTDIR_=/chroot/sl5", "PBS_O_ROOTDIR_ is not allowed"),
    ("PBS_O_ROOTDIR=/a,PBS_O_ROOTDIR=/b", "2 times with different values"),
    ("PBS_O_ROOTDIR=/chroot/sl5,PBS_O_ROOTDIR=/b", "different values"),
    ("FOO=x\\,PBS_O_ROOTDIR=/tmp/x", "inside the value of another variable"),
    ("PBS_O_ROOTDIR=/chroot/el7", "not allowed in queue batch"),
    ("PBS_O_ROOTDIR=/chroot/root-only,A=1", "not allowed for user nobody"),
])
def test_refused(raw: str, words: str) -> None:
    user = "nobody" if "root-only" in raw else "root"
    with pytest.raises(UserError) as exc:
        decide(raw, user=user)
    assert words in exc.value.user_msg
    assert "\n" not in exc.value.user_msg and "\x00" not in exc.value.user_msg


def test_allowed_list_is_filtered_per_user_and_queue() -> None:
    with pytest.raises(UserError) as exc:
        decide("PBS_O_ROOTDIR=/x", user="nobody", queue="batch")
    assert exc.value.user_msg.endswith("allowed: /chroot/sl5")
    assert decide("PBS_O_ROOTDIR=/chroot/el7", queue="long") == "/chroot/el7"


def test_show_escapes_and_truncates() -> None:
    assert gate.show("a\nb") == "a\\nb"
    assert gate.show("/" + "x" * 500).endswith("...") and len(gate.show("x" * 500)) == 123


@pytest.mark.parametrize("rl", ["nodes=1:ppn=\u00b2", "nodes=\u0663:ppn=2,mem=\u00b2mb",
                                "ncpus=1e9,mem=-5gb,pmem=,vmem=x", ",,=,nodes",
                                "nodes=1:ppn=" + "9" * 40])
def test_odd_resource_lists_never_raise(rl: str) -> None:
    from pbs_chroot.resources import limits_for
    lim = limits_for(rl, "hard", None, True, None)
    assert lim.cpus >= 1 and (lim.mem_request is None or lim.mem_request > 0)
