"""Stands in for OpenPBS's ``pbs_python --hook -i IN -o OUT ... HOOK.PY``: one hook, one event.

Test infrastructure, not product. Run by tests/openpbsemu.py as root, as pbs_mom runs
pbs_python (execjob_*/exechost_*: a process of its own, cwd PBS_HOME/mom_priv/hooks/tmp,
environment PATH=/bin:/usr/bin and PBS_CONF_FILE) or the server runs queuejob. It builds a
``pbs`` module with the API surface the fixtures show (../shared/fixtures/openpbs: the
attributes each event has, their string forms, e.argv a list, e.env a dict), runs the
hook's text, and writes what the hook did as JSON: accept/reject and its message,
progname/argv/env (launch), the job's comment, delete()/rerun() (flags the mom acts on
whether the hook accepts or not: mom_hook_func.c get_hook_results), vnode state/comment.
e.accept() and e.reject() end the hook (SystemExit), as in pbs_python; any other
exception is a hook error (JOB_EXEC_HOOKERROR at the mom).

    python -I -S openpbs_hookrun.py IN.json OUT.json HOOK.py   (-S: no site-packages, as
    pbs_python has none of the site's: the hook finds the package by its own LIBDIR)
"""
import json
import sys
import traceback
import types

# src/include/hook.h: HOOK_EVENT_* (queuejob 1, begin 64, launch 2048 ... as captured).
EVENTS = {"queuejob": 0x01, "modifyjob": 0x02, "execjob_begin": 0x40,
          "execjob_prologue": 0x80, "execjob_epilogue": 0x100, "execjob_end": 0x200,
          "execjob_launch": 0x800, "exechost_periodic": 0x1000, "exechost_startup": 0x2000,
          "execjob_attach": 0x4000}
MOM_EVENTS = 0x40 | 0x80 | 0x100 | 0x200 | 0x800 | 0x1000 | 0x2000 | 0x4000
ND_OFFLINE = 2
OUT: dict = {"accepted": True, "reject_msg": "", "log": [], "job": {}, "vnodes": {},
             "error": ""}


class _Resources(dict):
    """Resource_List: missing names read as None; str() is the "k=v,..." form the mom logs."""

    def __getitem__(self, key):
        return dict.get(self, key)

    def __str__(self):
        return ",".join(f"{k}={v}" for k, v in dict.items(self))


class _Job:
    _TRACKED = ("comment",)

    def __init__(self, attrs: dict, event_type: int) -> None:
        object.__setattr__(self, "_type", event_type)
        for key, value in attrs.items():
            if key == "Resource_List":
                value = _Resources(value)
            object.__setattr__(self, key, value)

    def __getattr__(self, name):
        return None  # an unset attribute reads as None

    def __setattr__(self, name, value):
        if name not in self._TRACKED:
            raise AttributeError(f"job attribute {name} is read-only here")
        object.__setattr__(self, name, value)
        OUT["job"][name] = str(value)

    def delete(self):
        if not self._type & MOM_EVENTS:
            raise NotImplementedError("delete(): only for mom hooks")
        OUT["job"]["_delete"] = True

    def rerun(self):
        if not self._type & MOM_EVENTS:
            raise NotImplementedError("rerun(): only for mom hooks")
        OUT["job"]["_rerun"] = True


class _Vnode:
    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "comment", None)

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        OUT["vnodes"].setdefault(self._name, {})[name] = value


class _Event:
    def __init__(self, spec: dict) -> None:
        self.type = EVENTS[spec["event"]]
        self.hook_name = spec.get("hook_name", "pbs_chroot")
        self.requestor = spec.get("requestor", "pbs_mom")
        self.requestor_host = spec.get("requestor_host", "localhost")
        if "job" in spec:
            self.job = _Job(spec["job"], self.type)
        if "job_o" in spec:
            self.job_o = _Job(spec["job_o"], self.type)
        if self.type & MOM_EVENTS:
            self.vnode_list = {spec["local_nodename"]: _Vnode(spec["local_nodename"])}
        if spec["event"] == "exechost_periodic":
            self.job_list = {j: None for j in spec.get("job_list", [])}
        if spec["event"] == "execjob_attach":
            self.pid = spec["pid"]
        if spec["event"] == "execjob_launch":
            self.progname = spec["progname"]
            self.argv = list(spec["argv"])
            self.env = dict(spec["env"])

    def accept(self, code: int = 0):
        raise SystemExit(0)

    def reject(self, msg: str = ""):
        OUT["accepted"] = False
        OUT["reject_msg"] = str(msg)
        raise SystemExit(0)


def _module(spec: dict, event: _Event) -> types.ModuleType:
    pbs = types.ModuleType("pbs")
    for name, value in EVENTS.items():
        setattr(pbs, name.upper(), value)
    pbs.ND_OFFLINE = ND_OFFLINE
    pbs.LOG_DEBUG, pbs.LOG_WARNING, pbs.LOG_ERROR = 0x0004, 0x0008, 0x0001
    pbs.event = lambda: event
    pbs.get_local_nodename = lambda: spec["local_nodename"]
    pbs.logmsg = lambda level, msg: OUT["log"].append(str(msg))
    kinds = spec.get("queue_types", {})  # name -> "Execution" (the default) or "Route"
    server = types.SimpleNamespace(
        default_queue=spec.get("default_queue", "workq"),
        queue=lambda name: types.SimpleNamespace(queue_type=kinds.get(name, "Execution")))
    pbs.server = lambda: server
    return pbs


def main(argv: list) -> int:
    src, dst, hook = argv[1:4]
    with open(src) as f:
        spec = json.load(f)
    event = _Event(spec)
    sys.modules["pbs"] = _module(spec, event)
    before = set(sys.modules)
    import time
    start = time.perf_counter()
    try:
        with open(hook) as f:
            code = compile(f.read(), hook, "exec")
        exec(code, {"__name__": "__main__", "__file__": hook})
    except SystemExit:
        pass
    except BaseException:
        OUT["error"] = traceback.format_exc()
    OUT["seconds"] = time.perf_counter() - start  # the hook text's own time (tests only)
    OUT["modules"] = sorted(set(sys.modules) - before)  # what the hook loaded (tests only)
    if spec["event"] == "execjob_launch":
        OUT["progname"] = str(event.progname)
        OUT["argv"] = [str(a) for a in event.argv]
        OUT["env"] = {str(k): str(v) for k, v in event.env.items()}
    with open(dst, "w") as f:
        json.dump(OUT, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
