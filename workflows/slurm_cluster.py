"""The SLURM side shared by slurm_dask_jobqueue.py and slurm_realign.py: the options that
size the worker jobs, and a dask-jobqueue SLURMCluster started the way bigalign wants it
(one single-threaded worker process per core; workers retired before the walltime so that
adapt() replaces them). Import it from a script in this folder; dask-jobqueue is not a
bigalign dependency (pip install dask-jobqueue)."""

import sys


def add_job_options(p) -> None:
    """The worker-job options both scripts take."""
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs (nodes), default 4")
    p.add_argument("--cores", type=int, default=32, help="cores per job, default 32")
    p.add_argument("--memory", default="128GB", help="memory per job, default 128GB")
    p.add_argument("--walltime", default="04:00:00", help="per job, [D-]HH:MM:SS")
    p.add_argument("--queue", help="partition")
    p.add_argument("--account")
    p.add_argument("--interface", help="network interface the nodes share, e.g. ib0")


def minutes(walltime: str) -> float:
    """SLURM [D-]HH:MM:SS to minutes."""
    days, _, hms = walltime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def slurm_cluster(args, log_directory: str, script: str, **extra):
    """A SLURMCluster for ``args`` (see :func:`add_job_options`), logging under
    ``log_directory``; ``extra`` goes to SLURMCluster (e.g. scheduler_options). None, with
    a message on stderr, when dask-jobqueue is not installed (``script`` names the caller)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print(f"{script} needs dask-jobqueue, which bigalign does not install: "
              "pip install dask-jobqueue", file=sys.stderr)
        return None
    lifetime = max(minutes(args.walltime) - 10, 5)
    return SLURMCluster(
        queue=args.queue, account=args.account, walltime=args.walltime,
        cores=args.cores, memory=args.memory,
        # one single-threaded worker process per core, as `bigalign --workers N` does
        processes=args.cores,
        interface=args.interface,
        # retire workers before SLURM kills them at the walltime; adapt() then submits
        # replacement jobs, and Dask moves the work instead of losing it
        worker_extra_args=["--lifetime", f"{lifetime:.0f}m", "--lifetime-stagger", "4m"],
        log_directory=log_directory, **extra)


def start_workers(cluster, args, where: str = "") -> None:
    """Keep ``args.jobs`` worker jobs and wait for the first job's workers: bigalign sizes
    its plan to the workers it sees when it starts."""
    cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
    print(f"scheduler {cluster.scheduler_address}{where}; waiting for the first job to "
          "leave the SLURM queue", file=sys.stderr)
    cluster.wait_for_workers(args.cores)


__all__ = ["add_job_options", "minutes", "slurm_cluster", "start_workers"]
