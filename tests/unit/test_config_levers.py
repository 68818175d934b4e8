"""Issue 16's settings: early_attach, stage_grace, defer_teardown, identity_cache,
shell_cache."""
import pytest

from pbs_chroot import config
from pbs_chroot.errors import ConfigError

IMAGE = "\n[image /chroot/sl5]\n"


def test_defaults_keep_the_old_teardown() -> None:
    cfg = config.parse("[pbs_chroot]\n" + IMAGE)
    assert (cfg.early_attach, cfg.stage_grace, cfg.defer_teardown, cfg.identity_cache,
            cfg.shell_cache) == (True, 0.0, False, 60.0, True)


@pytest.mark.parametrize("text, want", [
    ("stage_grace = 0", ("stage_grace", 0.0)),
    ("stage_grace = 2.5", ("stage_grace", 2.5)),
    ("stage_grace = 3600", ("stage_grace", 3600.0)),
    ("identity_cache = 0", ("identity_cache", 0.0)),
    ("early_attach = no", ("early_attach", False)),
    ("defer_teardown = yes", ("defer_teardown", True)),
    ("shell_cache = no", ("shell_cache", False)),
])
def test_settings_are_read(text: str, want: tuple) -> None:
    cfg = config.parse(f"[pbs_chroot]\n{text}\n{IMAGE}")
    assert getattr(cfg, want[0]) == want[1]


@pytest.mark.parametrize("text", ["stage_grace = -1", "stage_grace = 3601", "stage_grace = x",
                                  "identity_cache = nan", "early_attach = maybe",
                                  "shell_cache = sometimes"])
def test_bad_settings_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        config.parse(f"[pbs_chroot]\n{text}\n{IMAGE}")
