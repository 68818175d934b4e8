"""OpenPBS's adapter (issue 14): what it reads from the job and what it writes, without a node."""
import pytest

from pbs_chroot import config, gate, openpbs, openpbsinstall
from pbs_chroot.errors import ConfigError, UserError


def test_local_resources_sum_this_hosts_vnodes_only() -> None:
    ev = "(vm:ncpus=2:mem=1048576kb+vm[1]:ncpus=1:mem=1gb)+(vm2:ncpus=4:mem=8gb)+(vmx:ncpus=8)"
    assert openpbs.local_resources(ev, "vm", "mem=99gb") == f"mem={2 << 30}b,ncpus=3"
    assert openpbs.local_resources(ev, "vm2", "") == f"mem={8 << 30}b,ncpus=4"
    assert openpbs.local_resources("(vmx:ncpus=8)", "vmx", "") == "ncpus=8"
    # Not named: the job-wide list, as the Torque hooks read it.
    assert openpbs.local_resources(ev, "other", "mem=100mb,ncpus=1") == "mem=100mb,ncpus=1"
    assert openpbs.local_resources("", "vm", "ncpus=1") == "ncpus=1"
    # What it does not understand counts for nothing (never a guess).
    assert openpbs.local_resources("(vm:ncpus=²:mem=lots)", "vm", "x") == "ncpus=1"


def test_launch_argv_puts_the_shim_first() -> None:
    # The job's shell: argv [] from pbs_mom, which will make argv[0] "-" + basename(progname).
    assert openpbs.launch_argv("/s", "/c", "/bin/bash", []) == \
        ["/s", "--config", "/c", "--login", "--", "/bin/bash"]
    # A TM task: passed as it is (start_process execvp's it).
    assert openpbs.launch_argv("/s", "/c", "hostname", ["hostname", "-f"]) == \
        ["/s", "--config", "/c", "--", "hostname", "-f"]


class _Job:
    def __init__(self, resources: object) -> None:
        self.Resource_List = resources


def test_resource_value_is_text_or_none() -> None:
    class Res(dict):
        def __getitem__(self, key: str) -> object:
            return dict.get(self, key)
    assert openpbs.resource_value(_Job(Res(image="/chroot/sl5")), "image") == "/chroot/sl5"
    assert openpbs.resource_value(_Job(Res(ncpus=1)), "image") is None
    assert openpbs.resource_value(_Job({}), "image") is None  # KeyError: none asked for
    assert openpbs.resource_value(object(), "image") is None


def test_image_resource_is_a_resource_name() -> None:
    assert config.parse("[pbs_chroot]\n").image_resource == "image"
    assert config.parse("[pbs_chroot]\nimage_resource = os_image\n").image_resource == "os_image"
    for bad in ("1x", "a b", "im/age", "ïmage", ""):
        with pytest.raises(ConfigError, match="image_resource"):
            config.parse(f"[pbs_chroot]\nimage_resource = {bad}\n")


def test_the_gate_names_the_request_as_the_user_wrote_it() -> None:
    cfg = config.parse("[pbs_chroot]\n[image /chroot/sl5]\n")
    with pytest.raises(UserError) as e:
        gate.check_value("/chroot/sl5/", cfg, "u", "q", "-l image")
    assert e.value.user_msg == ("can't use image -l image=/chroot/sl5/: not an image of this "
                                "site; allowed: /chroot/sl5")
    with pytest.raises(UserError, match="PBS_O_ROOTDIR=/x"):
        gate.check_value("/x", cfg, "u", "q")


def test_qmgr_commands_create_the_resource_for_the_moms_and_four_hooks() -> None:
    cmds = openpbsinstall.qmgr_commands("/x/openpbs_hook.py", "image")
    assert cmds[0] == "create resource image type=string,flag=m"
    imports = [c for c in cmds if c.startswith("import hook")]
    assert [c.split()[2] for c in imports] == list(openpbsinstall.HOOKS)
    events = ",".join(e for e, _, _ in openpbsinstall.HOOKS.values()).split(",")
    assert sorted(events) == sorted(openpbs.EVENTS)  # every event handled is hooked, once
    assert "set hook pbs_chroot_begin fail_action = offline_vnodes" in cmds
    assert "set hook pbs_chroot_end order = 50" in cmds  # before the cgroups hook (100) ends


def test_rendered_files_refuse_odd_paths() -> None:
    text = openpbsinstall.render_hook("/etc/c.conf", "/usr/libexec/s", "/opt/lib")
    assert 'CONFIG = "/etc/c.conf"' in text and "hook(pbs, CONFIG, SHIM, SYSLOG)" in text
    compile(text, "openpbs_hook.py", "exec")
    compile(openpbsinstall.render_shim("/usr/bin/python3", "/opt/lib"), "shim", "exec")
    for bad in ("rel/path", '/a"b', "/a\\b", "/a\nb"):
        with pytest.raises(UserError):
            openpbsinstall.render_hook(bad, "/s", "/l")
