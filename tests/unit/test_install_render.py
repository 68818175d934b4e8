"""The entry scripts in the repo are exactly what `pbs-chroot install` writes by default."""
import pytest

from pbs_chroot import admin
from pbs_chroot.errors import UserError
from tests.conftest import REPO


@pytest.mark.parametrize("name, path", [("prologue", "prologue/prologue"),
                                        ("epilogue", "epilogue/epilogue")])
def test_repo_scripts_match_the_template(name: str, path: str) -> None:
    text = (REPO / path).read_text()
    assert text == admin.render_hook(name)
    assert len(text.splitlines()) <= 30


def test_render_refuses_odd_paths() -> None:
    with pytest.raises(UserError):
        admin.render_hook("prologue", python="python3")
    with pytest.raises(UserError):
        admin.render_hook("prologue", config='/etc/x"; import os')
