"""pbs_chroot's benchmarks: `sudo ./benchmarks/run` (see benchmarks/README.md)."""
