#!/bin/sh
# The naive baseline: the prologue a site might write in shell, for the benchmarks only.
# Cold path every time (no shared stage), mount(8) for every step, no journal, no lock, no
# path checks: NOT SAFE to install. pbs_mom's argv: ID USER GROUP JOBNAME RESOURCES QUEUE ...
# naive.conf beside it (written by the harness) sets QSTAT IMAGE CGROOT CONTROLLERS CGPARENT
# STATE PBS_HOME.
. "${0%/*}/naive.conf"
job=$1
xml=$("$QSTAT" -f -x "$job") || { echo "naive: can't read job $job" >&2; exit 2; }
# PBS_O_ROOTDIR=VALUE, up to the next ',' or '<' (escapes ignored: a baseline, not a gate).
root=$(printf '%s\n' "$xml" | sed -n 's/.*[>,]PBS_O_ROOTDIR=\([^,<]*\).*/\1/p')
for c in $CONTROLLERS; do
    d=$CGROOT/$c/$CGPARENT/$job
    mkdir -p "$d" && echo "$PPID" > "$d/cgroup.procs" || exit 2
done
echo 1024 > "$CGROOT/cpu/$CGPARENT/$job/cpu.shares"
[ -n "$root" ] || exit 0
[ "$root" = "$IMAGE" ] || { echo "naive: job $job: image $root not allowed" >&2; exit 1; }
v=$(readlink -f "$root")
echo "$v" > "$STATE/$job"
set -e
mount --bind "$v" "$v"
mount --make-rslave "$v"
mount -t proc -o nosuid,nodev,noexec proc "$v/proc"
b() {  # b SOURCE TARGET OPTIONS [rbind]: bind, make it a slave, remount with OPTIONS
    mount "--${4:-bind}" "$1" "$v$2"
    mount --make-rslave "$v$2"
    mount -o "remount,bind,$3" "$v$2"
}
b /sys /sys ro,nosuid,nodev,noexec
b /dev /dev nosuid,noexec
b /dev/pts /dev/pts nosuid,noexec
b /dev/shm /dev/shm nosuid,nodev,noexec
b /home /home nosuid,nodev rbind
b /etc/passwd /etc/passwd ro,nosuid,nodev
b /etc/group /etc/group ro,nosuid,nodev
if [ -e /etc/resolv.conf ]; then b /etc/resolv.conf /etc/resolv.conf ro,nosuid,nodev; fi
if [ -e /etc/hosts ]; then b /etc/hosts /etc/hosts ro,nosuid,nodev; fi
b "$PBS_HOME/mom_priv/jobs" "$PBS_HOME/mom_priv/jobs" ro,nosuid,nodev
mount -o remount,bind,ro,nosuid,nodev "$v"
