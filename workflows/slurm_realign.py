#!/usr/bin/env python3
"""Scheduled re-alignment on SLURM: dask-jobqueue submits Dask workers as SLURM jobs, the
scheduler writes a scheduler file on the shared filesystem, and `bigalign realign` runs
against it (its fit and apply on the workers).

Run it from cron on a login node, from scrontab, or inside a small long-running SLURM job
(the Dask scheduler lives in this process, so compute nodes must reach it: --interface):

    pip install dask-jobqueue      # not a bigalign dependency
    python workflows/slurm_realign.py /shared/align/realign.toml \\
        --scheduler-file /shared/align/scheduler.json --summary /shared/align/summary.json \\
        --jobs 8 --queue cpu --account myproj

    # scrontab -e:   0 3 * * 0  python /shared/bigalign/workflows/slurm_realign.py ...

This script exits with bigalign's own exit code: 0 published (or already finished), 4 the
gate rejected the candidate (nothing published; do not resubmit), 2 bad configuration or
input, 75 storage or cluster unavailable and 130 interrupted (resubmit the same command:
the run resumes). Without --run-id the run id is derived from the configuration and the
inputs, so resubmitting the same command on the same data resumes the same run, and a run
on new pairs is a new run. Every path in the configuration must be on a filesystem all
nodes mount, or an object store.

The scheduler file also lets other processes use the cluster while it lives, e.g.
`bigalign apply REGISTRY corpus.zarr -o out.zarr --scheduler /shared/align/scheduler.json`.
"""

import argparse
import os
import subprocess
import sys

from slurm_cluster import add_job_options, slurm_cluster, start_workers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the realign configuration (TOML)")
    p.add_argument("--scheduler-file", required=True,
                   help="where the Dask scheduler writes its address (shared filesystem)")
    p.add_argument("--summary", help="write the verdict (JSON) here")
    p.add_argument("--run-id", help="name the run (default: derived from config and inputs)")
    add_job_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the worker job script and the bigalign command, submit nothing")
    args = p.parse_args(argv)

    command = ["bigalign", "realign", args.config, "--scheduler", args.scheduler_file,
               "--wait", "180"]
    if args.summary:
        command += ["--summary", args.summary]
    if args.run_id:
        command += ["--run-id", args.run_id]

    logs = os.path.join(os.path.dirname(os.path.abspath(args.scheduler_file)), "slurm-logs")
    # the scheduler writes its address to the scheduler file for `bigalign --scheduler FILE`
    cluster = slurm_cluster(args, logs, "slurm_realign.py",
                            scheduler_options={"scheduler_file": args.scheduler_file})
    if cluster is None:
        return 2
    with cluster:
        if args.dry_run:
            print(cluster.job_script())
            print(" ".join(command))
            return 0
        start_workers(cluster, args, f" (file {args.scheduler_file})")
        return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
