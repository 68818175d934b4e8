#!/bin/sh
#PBS -N in-sl5
#PBS -l nodes=1:ppn=1,walltime=00:05:00
# Submit with:   qsub -v PBS_O_ROOTDIR=/chroot/sl5 job.sh
#           or:  qsub -D /chroot/sl5 job.sh
# The job runs inside the image: its /etc, its libraries, its tools, with
# the node's /proc, /dev, your home directory and this script visible.
cat /etc/os-release 2>/dev/null || cat /etc/redhat-release
id
cd "$PBS_O_WORKDIR" && pwd
