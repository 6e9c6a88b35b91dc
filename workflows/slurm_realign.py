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


def _minutes(walltime: str) -> float:
    """SLURM [D-]HH:MM:SS to minutes."""
    days, _, hms = walltime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the realign configuration (TOML)")
    p.add_argument("--scheduler-file", required=True,
                   help="where the Dask scheduler writes its address (shared filesystem)")
    p.add_argument("--summary", help="write the verdict (JSON) here")
    p.add_argument("--run-id", help="name the run (default: derived from config and inputs)")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs (nodes), default 4")
    p.add_argument("--cores", type=int, default=32, help="cores per job, default 32")
    p.add_argument("--memory", default="128GB", help="memory per job, default 128GB")
    p.add_argument("--walltime", default="04:00:00", help="per job, [D-]HH:MM:SS")
    p.add_argument("--queue", help="partition")
    p.add_argument("--account")
    p.add_argument("--interface", help="network interface the nodes share, e.g. ib0")
    p.add_argument("--dry-run", action="store_true",
                   help="print the worker job script and the bigalign command, submit nothing")
    args = p.parse_args(argv)

    command = ["bigalign", "realign", args.config, "--scheduler", args.scheduler_file,
               "--wait", "180"]
    if args.summary:
        command += ["--summary", args.summary]
    if args.run_id:
        command += ["--run-id", args.run_id]

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print("slurm_realign.py needs dask-jobqueue, which bigalign does not install: "
              "pip install dask-jobqueue", file=sys.stderr)
        return 2

    lifetime = max(_minutes(args.walltime) - 10, 5)
    cluster = SLURMCluster(
        queue=args.queue, account=args.account, walltime=args.walltime,
        cores=args.cores, memory=args.memory,
        # one single-threaded worker process per core, as `bigalign --workers N` does
        processes=args.cores,
        interface=args.interface,
        # the scheduler writes its address here for `bigalign --scheduler FILE`
        scheduler_options={"scheduler_file": args.scheduler_file},
        # retire workers before SLURM kills them at the walltime; adapt() below submits
        # replacements, and Dask moves the work instead of losing it
        worker_extra_args=["--lifetime", f"{lifetime:.0f}m", "--lifetime-stagger", "4m"],
        log_directory=os.path.join(os.path.dirname(os.path.abspath(args.scheduler_file)),
                                   "slurm-logs"),
    )
    with cluster:
        if args.dry_run:
            print(cluster.job_script())
            print(" ".join(command))
            return 0
        cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address} (file {args.scheduler_file}); waiting "
              "for the first job to leave the SLURM queue", file=sys.stderr)
        # bigalign sizes its plan to the workers it sees when it starts
        cluster.wait_for_workers(args.cores)
        return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
