"""The fault matrix: every streaming command against every fault, with its exit code and
what a rerun gives.

    python benchmarks/fault_matrix.py                  # everything (~5 min on 2 cores)
    python benchmarks/fault_matrix.py --only apply,export --json results.json

For fit, apply, import, export and realign, on small data in a temporary folder, each row
runs the real CLI in a subprocess with one fault, checks the exit code the README's table
documents for it, then reruns the same command without the fault and checks that it exits
0 with the same data as an uninterrupted run (transform arrays, output arrays and ids, the
rows of the Parquet files: byte for byte):

===================  ==========================================================  =========
fault                how                                                         exit code
===================  ==========================================================  =========
SIGKILL at POINT     ``BIGALIGN_FAULTS=kill:POINT@K``, every fault point          -9
SIGTERM at POINT     ``BIGALIGN_FAULTS=term:POINT@K`` (the CLI unwinds)           130
chunk truncated      a done region's chunk truncated between a kill and the rerun  (0)
two checkpoints      run 1 (``--checkpoint c1``) in flight, run 2 ``--checkpoint     2
                     c2 --overwrite`` on the same output
disk full            the output on a 256 KiB tmpfs (root only; then enlarged)      2
scheduler killed     ``dask scheduler`` killed after the first unit/marker         75
workers killed       every ``dask worker`` killed (``--stall-timeout 5``)          75
===================  ==========================================================  =========

The kill and term rows also check that the fault landed mid-run (a run that finished before
reaching its point is a failure of the matrix, not a pass). Exits 1 when any row differs.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS, DIM, CHUNK = 20_000, 16, 500
SMALL = ["--block-mb", "0.1", "-q"]

POINTS = {
    "fit": [("fit.block", 3), ("fit.unit-saved", 2), ("fit.solved", 1), ("fit.saved", 1)],
    "apply": [("apply.begun", 1), ("apply.region-written", 2), ("apply.region-done", 2),
              ("apply.before-complete", 1)],
    "import": [("import.begun", 1), ("import.region-written", 2), ("import.region-done", 2),
               ("import.before-complete", 1)],
    "export": [("export.begun", 1), ("export.file-written", 2), ("export.file-done", 2),
               ("export.before-complete", 1)],
    "realign": [("realign.split", 1), ("realign.fitted", 1), ("realign.evaluated", 1),
                ("realign.version-written", 1), ("apply.region-done", 2),
                ("realign.applied", 1), ("realign.published", 1)],
}


def cli(*argv, faults=None, env=None, wait=True, timeout=300):
    e = dict(os.environ, **(env or {}))
    e.pop("BIGALIGN_FAULTS", None)
    if faults:
        e["BIGALIGN_FAULTS"] = faults
    args = [sys.executable, "-m", "bigalign.cli", *map(str, argv)]
    if not wait:
        return subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(args, env=e, capture_output=True, text=True, timeout=timeout)


class Command:
    """One command of the matrix: ``argv(out)`` runs it writing ``out``; ``data(out)``
    reads what it wrote (bytes to compare); ``progress(out)`` lists its unit/marker files."""

    def __init__(self, name, argv, data, progress_dir="done"):
        self.name, self.argv, self.data, self.progress_dir = name, argv, data, progress_dir

    def progress(self, out, checkpoint=None) -> list:
        d = os.path.join(checkpoint or f"{out}.checkpoint", self.progress_dir)
        return os.listdir(d) if os.path.isdir(d) else []


def zarr_bytes(path, *names):
    import zarr

    node = zarr.open(str(path), mode="r")
    arrays = [node] if not names else [node[n] for n in names if n in node]
    return b"".join(np.ascontiguousarray(a[:]).tobytes() if a.dtype.kind != "T" else
                    "\0".join(a[:].tolist()).encode() for a in arrays)


def transform_bytes(path):
    import bigalign

    t = bigalign.Transform.load(str(path))
    return t.rotation.tobytes() + t.source_mean.tobytes() + t.target_mean.tobytes()


def parquet_bytes(path):
    import polars as pl

    files = sorted(glob.glob(os.path.join(str(path), "*.parquet")))
    df = pl.concat([pl.read_parquet(f) for f in files])
    return df["id"].to_numpy().tobytes() + np.stack(df["embedding"].to_numpy()).tobytes()


def realign_bytes(work):
    """The published version's transform and name, and the corpus it mapped."""
    from bigalign.storage.registry import Registry

    reg = Registry(os.path.join(work, "reg"))
    current = reg.current()
    mapped = sorted(glob.glob(os.path.join(work, "mapped-*.zarr")))
    return transform_bytes(reg.transform_url(current)) + current.encode() + b"".join(
        zarr_bytes(x, "embeddings", "ids") for x in mapped)


def make_data(work):
    import zarr

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import planted

    a, b, _ = planted(ROWS, DIM, noise=0.1, offset_a=1.0, seed=3)
    for name, x in (("a.zarr", a), ("b.zarr", b)):
        zarr.create_array(os.path.join(work, name), data=x, chunks=(CHUNK, DIM),
                          compressors=None)
    for k, part in enumerate(np.array_split(a, 3)):
        np.save(os.path.join(work, f"part-{k}.npy"), part)
    ids = np.arange(ROWS, dtype=np.int64) * 7 + 1
    for name, x, model in (("old.store", a, "old"), ("new.store", b, "new")):
        g = zarr.open_group(os.path.join(work, name), mode="w")
        g.create_array("embeddings", data=x, chunks=(CHUNK, DIM), compressors=None)
        g.create_array("ids", data=ids, chunks=(CHUNK,), compressors=None)
        g.attrs["model"] = model
    assert cli("fit", f"{work}/a.zarr", f"{work}/b.zarr", "-o", f"{work}/T", "--center",
               *SMALL).returncode == 0
    with open(os.path.join(work, "realign.toml"), "w") as f:
        f.write('registry = "reg"\n[pairs]\nsource = "old.store"\ntarget = "new.store"\n'
                'holdout = 0.2\n[fit]\ncenter = true\n[gate]\nmin_recall_at_10 = 0.5\n'
                '[apply]\ncorpus = "old.store"\noutput = "mapped-{version}.zarr"\n')


def commands(work):
    w = work
    return {
        "fit": Command("fit", lambda o: ("fit", f"{w}/a.zarr", f"{w}/b.zarr", "-o", o,
                                         "--center", *SMALL), transform_bytes, "units"),
        "apply": Command("apply", lambda o: ("apply", f"{w}/T", f"{w}/a.zarr", "-o", o,
                                             *SMALL), zarr_bytes),
        "import": Command("import", lambda o: ("import", *sorted(glob.glob(f"{w}/part-*.npy")),
                                               "-o", o, "--row-ids", "--chunk-rows", "1000",
                                               *SMALL),
                          lambda o: zarr_bytes(o, "embeddings", "ids")),
        "export": Command("export", lambda o: ("export", f"{w}/old.store", "--format",
                                               "parquet", "-o", o, "--rows-per-file", "2000",
                                               "-q"), parquet_bytes),
    }


class Matrix:
    def __init__(self):
        self.rows: list[dict] = []

    def row(self, command, fault, want, got, same, note=""):
        ok = got == want and same is not False
        self.rows.append({"command": command, "fault": fault, "expected": want, "exit": got,
                          "rerun_same": same, "ok": ok, "note": note})
        print(f"{'ok ' if ok else 'BAD'} {command:8s} {fault:38s} exit {got!s:>4} "
              f"(expected {want}) rerun {'same' if same else same} {note}", flush=True)


def rerun_same(cmd, out, ref, argv=None):
    r = cli(*(argv or cmd.argv(out)))
    return r.returncode == 0 and cmd.data(out) == ref


def signals(m, cmd, work, ref):
    for point, k in POINTS[cmd.name]:
        for action, want in (("kill", -signal.SIGKILL), ("term", 130)):
            out = os.path.join(work, f"{cmd.name}-{action}-{point}")
            r = cli(*cmd.argv(out), faults=f"{action}:{point}@{k}")
            landed = r.returncode != 0
            m.row(cmd.name, f"{'SIGKILL' if action == 'kill' else 'SIGTERM'} at {point}@{k}",
                  want, r.returncode, rerun_same(cmd, out, ref) if landed else None,
                  "" if landed else "the fault did not land")


def truncated(m, cmd, work, ref):
    out = os.path.join(work, f"{cmd.name}-truncated")
    r = cli(*cmd.argv(out), faults=f"kill:{cmd.name}.region-done@3")
    marker = sorted(cmd.progress(out))[0]
    start = int(marker.split("_")[2])
    emb = out if cmd.name == "apply" else os.path.join(out, "embeddings")
    import zarr

    chunk_rows = zarr.open_array(emb, mode="r").chunks[0]
    with open(os.path.join(emb, "c", str(start // chunk_rows), "0"), "r+b") as f:
        f.truncate(64)
    m.row(cmd.name, "chunk truncated behind a marker", 0, cli(*cmd.argv(out)).returncode,
          cmd.data(out) == ref, f"(killed: {r.returncode})")


def two_checkpoints(m, cmd, work, ref):
    out = os.path.join(work, f"{cmd.name}-two")
    c1, c2 = f"{out}.c1", f"{out}.c2"
    point = "export.file-done" if cmd.name == "export" else f"{cmd.name}.region-done"
    first = cli(*cmd.argv(out), "--checkpoint", c1, "--threads", "1",
                faults=f"delay:{point}@0.3", wait=False)
    deadline = time.monotonic() + 120
    while not cmd.progress(out, c1) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = cli(*cmd.argv(out), "--checkpoint", c2, "--overwrite")
    first.communicate(timeout=300)
    m.row(cmd.name, "two checkpoints on one output (second)", 2, second.returncode,
          first.returncode == 0 and cmd.data(out) == ref,
          f"(first run: exit {first.returncode})")


def disk_full(m, cmd, work, ref):
    if os.geteuid() != 0:
        m.row(cmd.name, "disk full", 2, None, None, "skipped: needs root for a tmpfs")
        return
    mnt = os.path.join(work, f"full-{cmd.name}")
    os.makedirs(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt], check=True)
    try:
        out = os.path.join(mnt, "out")
        r = cli(*cmd.argv(out))
        subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
        m.row(cmd.name, "disk full", 2, r.returncode, rerun_same(cmd, out, ref),
              r.stderr.strip().splitlines()[-1][:60] if r.stderr.strip() else "")
    finally:
        subprocess.run(["umount", "-l", mnt])


@contextlib.contextmanager
def dask_cluster(work, faults=None, workers=1):
    sf = os.path.join(work, f"sched-{time.time_ns()}.json")
    env = dict(os.environ)
    env.pop("BIGALIGN_FAULTS", None)
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                              "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                              "--scheduler-file", sf], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    wenv = dict(env, **({"BIGALIGN_FAULTS": faults} if faults else {}))
    procs = []
    while not os.path.exists(sf):
        time.sleep(0.1)
    for _ in range(workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                       "--scheduler-file", sf, "--nthreads", "1",
                                       "--no-dashboard", "--no-nanny"], env=wenv,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield sf, sched, procs
    finally:
        for p in [*procs, sched]:
            if p.poll() is None:
                p.kill()
            p.wait()


def lose_cluster_mid_run(work, argv, started, point, what) -> tuple:
    """Run ``argv`` on a fresh Dask cluster (tasks slowed at ``point``), kill its scheduler
    or every worker (``what``) once ``started()`` says the run has stored progress, and
    rerun it on a new cluster. Returns (exit code of the first run, whether the kill landed
    mid-run, the rerun's CompletedProcess)."""
    with dask_cluster(work, faults=f"delay:{point}@0.5") as (sf, sched, workers):
        run = cli(*argv, "--scheduler", sf, "--stall-timeout", "5", wait=False)
        deadline = time.monotonic() + 120
        while not started() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        landed = run.poll() is None
        for p in ([sched] if what == "scheduler" else workers):
            p.kill()
        run.communicate(timeout=300)
    with dask_cluster(work) as (sf, _, _):
        again = cli(*argv, "--scheduler", sf)
    return run.returncode, landed, again


def cluster_lost(m, cmd, work, ref, what):
    out = os.path.join(work, f"{cmd.name}-{what}-lost")
    point = {"fit": "fit.unit-saved", "export": "export.file-done"}.get(
        cmd.name, f"{cmd.name}.region-done")
    code, landed, again = lose_cluster_mid_run(work, cmd.argv(out),
                                               lambda: cmd.progress(out), point, what)
    m.row(cmd.name, f"{what} killed", 75, code,
          again.returncode == 0 and cmd.data(out) == ref,
          "" if landed else "the run ended before the kill")


def realign_rows(m, work):
    def fresh(name):
        w = realign_copy(work, name)
        return w, os.path.join(w, "realign.toml")

    base, cfg = fresh("realign-ref")
    assert cli("realign", cfg, "-q").returncode == 0
    ref = realign_bytes(base)
    for point, k in POINTS["realign"]:
        for action, want in (("kill", -signal.SIGKILL), ("term", 130)):
            w, cfg = fresh(f"realign-{action}-{point}")
            r = cli("realign", cfg, "-q", faults=f"{action}:{point}@{k}")
            landed = r.returncode != 0
            same = None
            if landed:
                same = cli("realign", cfg, "-q").returncode == 0 and realign_bytes(w) == ref
            m.row("realign", f"{'SIGKILL' if action == 'kill' else 'SIGTERM'} at {point}@{k}",
                  want, r.returncode, same, "" if landed else "the fault did not land")
    return ref


def realign_copy(work, name) -> str:
    """A fresh copy of the realign inputs (stores and config, no registry or output) at
    WORK/NAME, for one row."""
    w = os.path.join(work, name)
    shutil.copytree(work, w, ignore=shutil.ignore_patterns("*-*", "T", "T.*", "reg",
                                                           "mapped-*"))
    return w


def realign_lost(m, work, ref, what):
    """Realign with its fit and apply on a Dask cluster whose scheduler (or every worker)
    is killed once the fit has stored a unit."""
    w = realign_copy(work, f"realign-{what}-lost")
    units = os.path.join(w, "**", "units", "*.npz")
    code, landed, again = lose_cluster_mid_run(
        work, ("realign", os.path.join(w, "realign.toml"), "-q"),
        lambda: glob.glob(units, recursive=True), "fit.unit-saved", what)
    m.row("realign", f"{what} killed", 75, code,
          again.returncode == 0 and realign_bytes(w) == ref,
          "" if landed else "the run ended before the kill")


def realign_disk_full(m, work, ref):
    """Realign whose registry and mapped corpus lie on a full disk."""
    if os.geteuid() != 0:
        m.row("realign", "disk full", 2, None, None, "skipped: needs root for a tmpfs")
        return
    w = realign_copy(work, "realign-full")
    mnt = os.path.join(w, "disk")
    os.makedirs(mnt)
    with open(os.path.join(w, "realign.toml")) as f:
        text = f.read()
    cfg = os.path.join(w, "full.toml")
    with open(cfg, "w") as f:
        f.write(text.replace('registry = "reg"', f'registry = "{mnt}/reg"')
                .replace('output = "mapped-{version}.zarr"',
                         f'output = "{mnt}/mapped-{{version}}.zarr"'))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt], check=True)
    try:
        r = cli("realign", cfg, "-q")
        subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
        again = cli("realign", cfg, "-q")
        from bigalign.storage.registry import Registry

        reg = Registry(os.path.join(mnt, "reg"))
        mapped = sorted(glob.glob(os.path.join(mnt, "mapped-*.zarr")))
        same = again.returncode == 0 and ref == (
            transform_bytes(reg.transform_url(reg.current())) + reg.current().encode() +
            b"".join(zarr_bytes(x, "embeddings", "ids") for x in mapped))
        m.row("realign", "disk full", 2, r.returncode, same,
              r.stderr.strip().splitlines()[-1][:60] if r.stderr.strip() else "")
    finally:
        subprocess.run(["umount", "-l", mnt])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated commands (fit,apply,import,export,realign)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--no-cluster", action="store_true", help="leave out the Dask rows")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(POINTS)
    m = Matrix()
    with tempfile.TemporaryDirectory(prefix="bigalign-faults-") as work:
        make_data(work)
        for name, cmd in commands(work).items():
            if name not in only:
                continue
            out = os.path.join(work, f"{name}-ref")
            assert cli(*cmd.argv(out)).returncode == 0
            ref = cmd.data(out)
            signals(m, cmd, work, ref)
            if name in ("apply", "import"):
                truncated(m, cmd, work, ref)
            if name != "fit":
                two_checkpoints(m, cmd, work, ref)
                disk_full(m, cmd, work, ref)
            if not args.no_cluster:
                cluster_lost(m, cmd, work, ref, "scheduler")
                cluster_lost(m, cmd, work, ref, "workers")
        if "realign" in only:
            ref = realign_rows(m, work)
            realign_disk_full(m, work, ref)
            if not args.no_cluster:
                realign_lost(m, work, ref, "scheduler")
                realign_lost(m, work, ref, "workers")
    bad = [r for r in m.rows if not r["ok"]]
    print(f"\n{len(m.rows) - len(bad)} of {len(m.rows)} rows as documented")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m.rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
