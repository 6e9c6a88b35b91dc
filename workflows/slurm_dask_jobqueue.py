#!/usr/bin/env python3
"""Fit and apply on a SLURM cluster: dask-jobqueue submits Dask workers as SLURM jobs,
and bigalign runs on them through the scheduler's address.

Run it on a login node (or in a small long-running SLURM job): the Dask scheduler lives
in this process, so compute nodes must reach it (see --interface). The workers start
with this same Python (sys.executable), so its environment must be on a filesystem the
compute nodes mount; so must every input, output and checkpoint path, because the
workers read and write them.

    pip install dask-jobqueue      # not a bigalign dependency
    python workflows/slurm_dask_jobqueue.py /shared/emb/pairs_old.zarr \\
        /shared/emb/pairs_new.zarr --corpus /shared/emb/corpus_old.zarr \\
        --out /shared/align/run1 --jobs 8 --queue cpu --account myproj --dry-run

Cut short (walltime, preemption, Ctrl-C)? Run the same command again: fit and apply
resume from their checkpoints and finished steps are skipped.
"""

import argparse
import os
import sys


def _minutes(walltime: str) -> float:
    """SLURM [D-]HH:MM:SS to minutes."""
    days, _, hms = walltime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="source-model vectors of the paired rows (Zarr)")
    p.add_argument("target", help="target-model vectors of the same rows (Zarr)")
    p.add_argument("--corpus", help="array to map after fitting (default: SOURCE)")
    p.add_argument("--out", required=True, help="directory for the transform and output")
    p.add_argument("--rows", metavar="START:STOP", help="fit on this row range only")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs (nodes), default 4")
    p.add_argument("--cores", type=int, default=32, help="cores per job, default 32")
    p.add_argument("--memory", default="128GB", help="memory per job, default 128GB")
    p.add_argument("--walltime", default="04:00:00", help="per job, [D-]HH:MM:SS")
    p.add_argument("--queue", help="partition")
    p.add_argument("--account")
    p.add_argument("--interface", help="network interface the nodes share, e.g. ib0")
    p.add_argument("--dry-run", action="store_true",
                   help="print the worker job script and exit without submitting")
    args = p.parse_args(argv)

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print("slurm_dask_jobqueue.py needs dask-jobqueue, which bigalign does not "
              "install: pip install dask-jobqueue", file=sys.stderr)
        return 2
    import bigalign

    lifetime = max(_minutes(args.walltime) - 10, 5)
    cluster = SLURMCluster(
        queue=args.queue, account=args.account, walltime=args.walltime,
        cores=args.cores, memory=args.memory,
        # One single-threaded worker process per core, as `bigalign --workers N` does.
        processes=args.cores,
        interface=args.interface,
        # Retire workers before SLURM kills them at the walltime; adapt() below then
        # submits replacement jobs, and Dask moves the work instead of losing it.
        worker_extra_args=["--lifetime", f"{lifetime:.0f}m", "--lifetime-stagger", "4m"],
        log_directory=os.path.join(args.out, "slurm-logs"),
    )
    with cluster:
        if args.dry_run:
            print(cluster.job_script())
            return 0
        cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}; waiting for the first job to "
              "leave the SLURM queue", file=sys.stderr)
        # bigalign sizes its plan to the workers it sees when it starts.
        cluster.wait_for_workers(args.cores)
        run = dict(scheduler=cluster.scheduler_address, progress=sys.stderr.isatty())

        transform = os.path.join(args.out, "transform.zarr")
        output = os.path.join(args.out, "corpus.zarr")
        # fit and apply refuse to overwrite a finished result; skip what is done.
        try:
            bigalign.Transform.load(transform)
        except bigalign.InputError:  # absent, or a save cut short: fit (resumes)
            t = bigalign.fit(args.source, args.target, output=transform, center=True,
                             rows=args.rows, **run)
            print(f"fit: relative residual {t.metadata['relative_residual']:.4g}")
        if not (bigalign.output_status(output) or {}).get("complete"):
            r = bigalign.apply(transform, args.corpus or args.source, output, **run)
            print(f"apply: {r.rows:,} rows in {r.seconds:.0f}s")
    print(f"done: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
