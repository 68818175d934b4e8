#!/bin/sh
# The naive baseline's epilogue (see prologue.sh): kill what is left in the job's cgroup,
# append an accounting line, unmount the job's stage with umount(8), remove the cgroup.
# pbs_mom's argv: ID USER GROUP JOBNAME SESSION RESOURCES USED QUEUE ACCOUNT EXIT [SCRIPT].
. "${0%/*}/naive.conf"
job=$1
cg=$CGROOT/memory/$CGPARENT/$job
if [ -d "$cg" ]; then
    while [ -s "$cg/cgroup.procs" ]; do
        for pid in $(cat "$cg/cgroup.procs"); do kill -9 "$pid" 2>/dev/null; done
    done
    cpu=$(cat "$CGROOT/cpuacct/$CGPARENT/$job/cpuacct.usage")
    mem=$(cat "$cg/memory.max_usage_in_bytes")
    echo "{\"job_id\": \"$job\", \"user\": \"$2\", \"exit\": ${10}, \"cpu_ns\": $cpu, \"mem_peak_bytes\": $mem}" >> "$STATE/accounting.jsonl"
fi
rc=0
if [ -f "$STATE/$job" ]; then
    umount -R "$(cat "$STATE/$job")" || rc=2
    rm -f "$STATE/$job"
fi
for c in $CONTROLLERS; do
    d=$CGROOT/$c/$CGPARENT/$job
    if [ -d "$d" ]; then rmdir "$d" || rc=2; fi
done
exit $rc
