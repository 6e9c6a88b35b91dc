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
resume from their checkpoints, finished steps do nothing, and changed inputs or options
are refused naming what changed.
"""

import argparse
import os
import sys

from slurm_cluster import add_job_options, slurm_cluster, start_workers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="source-model vectors of the paired rows (Zarr)")
    p.add_argument("target", help="target-model vectors of the same rows (Zarr)")
    p.add_argument("--corpus", help="array to map after fitting (default: SOURCE)")
    p.add_argument("--out", required=True, help="directory for the transform and output")
    p.add_argument("--rows", metavar="START:STOP", help="fit on this row range only")
    add_job_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the worker job script and exit without submitting")
    args = p.parse_args(argv)

    cluster = slurm_cluster(args, os.path.join(args.out, "slurm-logs"),
                            "slurm_dask_jobqueue.py")
    if cluster is None:
        return 2
    import bigalign

    with cluster:
        if args.dry_run:
            print(cluster.job_script())
            return 0
        start_workers(cluster, args)
        run = dict(scheduler=cluster.scheduler_address, progress=sys.stderr.isatty())

        transform = os.path.join(args.out, "transform.zarr")
        output = os.path.join(args.out, "corpus.zarr")
        # Each step runs every time: a finished one with the same inputs and options does
        # nothing, an unfinished one resumes, and one whose inputs or options changed
        # (another --rows, new pairs) is refused naming the change, never reused silently.
        t = bigalign.fit(args.source, args.target, output=transform, center=True,
                         rows=args.rows, **run)
        print(f"fit: relative residual {t.metadata['relative_residual']:.4g}")
        r = bigalign.apply(transform, args.corpus or args.source, output, **run)
        print(f"apply: {r.rows_total:,} rows" + ("" if r.already_complete
                                                  else f" in {r.seconds:.0f}s"))
    print(f"done: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
