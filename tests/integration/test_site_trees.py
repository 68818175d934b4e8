"""Site trees in a stage: CA certificates, resolv.conf, hosts, localtime, application
directories, each with its own options; nothing of the host's writable unless configured."""
import os

import pytest

from pbs_chroot import config, mounts, stage
from pbs_chroot.errors import MountError
from pbs_chroot.state import ensure_layout
from tests.conftest import USER, Site

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real mounts")]


def site_trees(site: Site) -> dict:
    host = site.base / "host"
    trees = {"certs": host / "grid-security" / "certificates", "apps": host / "apps",
             "tz": host / "zoneinfo" / "Europe" / "Zurich"}
    trees["certs"].mkdir(parents=True)
    (trees["certs"] / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    trees["apps"].mkdir()
    (trees["apps"] / "tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(trees["apps"] / "tool", 0o755)
    trees["tz"].parent.mkdir(parents=True)
    trees["tz"].write_bytes(b"TZif2")
    return trees


def test_site_trees_each_with_its_options(site: Site) -> None:
    t = site_trees(site)
    site.write_config()
    site.config.write_text(site.config.read_text().replace("[binds]\n", (
        f"[binds]\n/etc/grid-security/certificates = {t['certs']} ro,optional\n"
        f"/etc/pki/tls/certs = {site.base}/no-such-bundle ro,optional\n"
        f"/etc/localtime = {t['tz']} ro,optional\n"
        f"/opt/apps = {t['apps']} ro,noexec\n")))
    site.add_mount_points(site.version)  # the new binds' (image audit --add-mount-points)
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    v = str(site.version)
    stage.join(cfg, "1.vm", v, USER)
    try:
        table = {m.mount_point: m for m in mounts.read_mountinfo()}
        assert os.listdir(v + "/etc/grid-security/certificates") == ["ca.pem"]
        assert open(v + "/etc/localtime", "rb").read() == b"TZif2"
        assert v + "/etc/pki/tls/certs" not in table  # optional, absent on the host: skipped
        assert {"ro", "nosuid", "nodev", "noexec"} <= table[v + "/opt/apps"].options
        for p in ("/etc/grid-security/certificates", "/etc/localtime"):
            assert {"ro", "nosuid", "nodev"} <= table[v + p].options
        # Nothing of the host's is writable unless the config says rw.
        rw = {b.target for b in stage.bind_set(cfg) if not b.readonly}  # /proc: its own
        for m in mounts.mounts_below(v, mounts.read_mountinfo()):
            inner = m.mount_point[len(v):] or "/"
            if "ro" not in m.options:
                assert any(inner == r or inner.startswith(r + "/") for r in rw), inner
            assert "nosuid" in m.options, inner
    finally:
        stage.leave(cfg, "1.vm", v)


def test_a_missing_site_tree_that_is_not_optional_fails_the_stage(site: Site) -> None:
    site.write_config()
    site.config.write_text(site.config.read_text().replace(
        "[binds]\n", f"[binds]\n/opt/apps = {site.base}/no-such-nfs ro\n"))
    cfg = config.load(str(site.config))
    ensure_layout(cfg.state_dir)
    with pytest.raises(MountError) as e:
        stage.join(cfg, "1.vm", str(site.version), USER)
    assert "no-such-nfs" in e.value.detail
    stage.sweep(cfg, str(site.version))
