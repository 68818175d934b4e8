"""Mounts that arrive after a job started (autofs, CVMFS on demand) reach the stage."""
import os

import pytest

from pbs_chroot import _sys, config, mounts, stage
from pbs_chroot.state import ensure_layout
from tests.conftest import USER, Site

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]


def test_a_mount_made_under_a_bound_tree_during_the_job_appears_inside(site: Site) -> None:
    # An autofs- or CVMFS-like tree: its own mount, shared as systemd makes it.
    tree = site.base / "cvmfs"
    tree.mkdir(mode=0o755)
    _sys.mount("tmpfs", str(tree), "tmpfs", 0, "mode=0755")
    try:
        (tree / "repo.example.org").mkdir()
        _sys.mount(None, str(tree), None, _sys.MS_SHARED)
        site.write_config()
        text = site.config.read_text().replace("[binds]\n", f"[binds]\n{tree} = {tree} ro,rec\n")
        site.config.write_text(text)
        site.add_mount_points(site.version)  # the new bind's (image audit --add-mount-points)
        cfg = config.load(str(site.config))
        ensure_layout(cfg.state_dir)
        v = str(site.version)
        stage.join(cfg, "1.vm", v, USER)
        try:
            inside = v + str(tree) + "/repo.example.org"
            assert os.listdir(inside) == []
            # The repository is mounted on demand, on the host, after the job started.
            # (As CVMFS mounts it: read-only, nosuid, nodev. A mount that arrives by
            # propagation keeps its own flags: the stage cannot remount it.)
            repo = str(tree / "repo.example.org")
            _sys.mount("tmpfs", repo, "tmpfs", 0, "mode=0755")
            try:
                (tree / "repo.example.org" / "README").write_text("on demand\n")
                _sys.mount(None, repo, None,
                           _sys.MS_REMOUNT | _sys.MS_RDONLY | _sys.MS_NOSUID | _sys.MS_NODEV)
                assert open(inside + "/README").read() == "on demand\n"
                # ... and nothing of the stage goes back out, and it is read-only inside.
                m = {m.mount_point: m for m in mounts.read_mountinfo()}
                assert inside in m and str(tree / "repo.example.org") in m
                with pytest.raises(OSError):
                    open(inside + "/x", "w")
            finally:
                stage.leave(cfg, "1.vm", v)
                _sys.umount2(repo)
        finally:
            stage.leave(cfg, "1.vm", v)
    finally:
        _sys.umount2(str(tree))
