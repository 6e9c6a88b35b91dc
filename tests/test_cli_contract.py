"""The command line's contract with schedulers and shells: exit codes (0, 1, 2, 3, 75, 130),
SIGTERM, output cut short by its reader, -q / --json, line-based progress in log files,
nested storage options. Real processes where it matters (signals, pipes, stderr not a TTY)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.storage import stores
from bigalign.cli import main, storage_options
from bigalign.errors import (ChunkReadError, CheckpointError, InputError, NonFiniteError,
                             TransientChunkReadError, TransientError, exit_code)
from conftest import main_cli, planted, write_zarr

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
ENV.pop("BIGALIGN_FAULTS", None)
CLI = [sys.executable, "-m", "bigalign.cli"]


def cli(*argv, env=None, **kw):
    return subprocess.run([*CLI, *map(str, argv)], env=env or ENV, capture_output=True,
                          text=True, timeout=120, **kw)


def run(capsys, *argv):
    code = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A pair of arrays, a fitted transform and a finished apply output."""
    tmp = tmp_path_factory.mktemp("contract")
    a, b, _ = planted(400, 6, noise=0.1, offset_b=2.0, seed=5)
    s, t = write_zarr(tmp / "a.zarr", a, 50), write_zarr(tmp / "b.zarr", b, 50)
    assert main(["fit", s, t, "-o", str(tmp / "t"), "--center", "-q"]) == 0
    assert main(["apply", str(tmp / "t"), s, "-o", str(tmp / "o.zarr"), "-q"]) == 0
    return {"s": s, "t": t, "tr": str(tmp / "t"), "out": str(tmp / "o.zarr"), "dir": tmp}


# ---- 1. one mapping from errors to exit codes ---------------------------------------------

@pytest.mark.parametrize("exc,code", [
    (InputError("x"), 2), (NonFiniteError("x"), 2), (CheckpointError("x"), 2),
    (ChunkReadError("corrupt chunk"), 2), (FileNotFoundError("x"), 2), (PermissionError("x"), 2),
    (OSError(errno.ENOSPC, "disk full"), 2),
    (TransientChunkReadError("x"), 75), (TransientError("x"), 75), (ConnectionError("x"), 75),
    (ConnectionResetError("x"), 75), (TimeoutError("x"), 75), (OSError(errno.EIO, "x"), 75),
    (KeyboardInterrupt(), 130), (RuntimeError("bug"), 1), (KeyError("bug"), 1),
])
def test_exit_code_mapping(exc, code):
    assert exit_code(exc) == code


def test_transient_chunk_error_is_both_kinds():
    e = TransientChunkReadError("x")
    assert isinstance(e, ChunkReadError) and isinstance(e, TransientError)


def test_transient_read_failure_exits_75(done, capsys, monkeypatch, tmp_path):
    """Storage that keeps timing out: retried, then exit 75 (EX_TEMPFAIL), not 2."""
    calls = {"n": 0}

    def timeout(self, *args, **kw):
        calls["n"] += 1
        raise TimeoutError("read timed out")

    monkeypatch.setattr(stores, "RETRY_BACKOFF", 0.001)
    monkeypatch.setattr(zarr.Array, "get_basic_selection", timeout)
    code, out, err = run(capsys, "fit", done["s"], done["t"], "-o", tmp_path / "t", "-q")
    assert code == 75, err
    assert "cannot read source rows" in err and "after 4 tries" in err and "TimeoutError" in err
    assert "rerun the same command later to resume" in err and "Traceback" not in err
    assert calls["n"] >= 4 and out == ""


def test_corrupt_chunk_is_not_retried_and_exits_2(tmp_path, capsys, monkeypatch):
    a, b, _ = planted(400, 4, seed=6)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    (tmp_path / "a.zarr" / "c" / "2" / "0").write_bytes(b"\x00" * 7)
    sleeps = []  # a retry would back off first
    from bigalign.execution import cluster
    for module in (stores, cluster):
        monkeypatch.setattr(module, "time", SimpleNamespace(sleep=sleeps.append))
    code, _, err = run(capsys, "fit", s, t, "-o", tmp_path / "t", "-q")
    assert code == 2 and "cannot read source rows 200:300" in err and sleeps == []


def test_unreachable_storage_at_open_exits_75(capsys, monkeypatch, tmp_path):
    pytest.importorskip("aiohttp")
    with socket.socket() as sock:  # a port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(stores, "RETRY_BACKOFF", 0.001)
    url = f"http://127.0.0.1:{port}/a.zarr"
    code, _, err = run(capsys, "fit", url, url, "-o", tmp_path / "t", "-q")
    assert code == 75, err
    assert f"source {url!r}: cannot open it (after 4 tries)" in err


def test_unexpected_error_exits_1_with_traceback(done, capsys, monkeypatch, tmp_path):
    def bug(*args, **kw):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(bigalign, "fit", bug)
    code, _, err = run(capsys, "fit", done["s"], done["t"], "-o", tmp_path / "t")
    assert code == 1
    assert "Traceback" in err and "RuntimeError: injected bug" in err and "a bug" in err


def test_sigterm_exits_130_and_the_rerun_resumes(tmp_path):
    """A real SIGTERM once the fit has stored a unit (the fault point term:fit.unit-saved@1,
    not a moment the test waits for): exit 130 and one line; the rerun resumes."""
    a, b, _ = planted(8000, 8, seed=7)
    s, t = write_zarr(tmp_path / "a.zarr", a, 200), write_zarr(tmp_path / "b.zarr", b, 200)
    argv = ["fit", s, t, "-o", str(tmp_path / "t"), "--block-mb", "0.01", "-q", "--threads",
            "1"]
    p = subprocess.run([*CLI, *argv], env=dict(ENV, BIGALIGN_FAULTS="term:fit.unit-saved@1"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 130, p.stderr
    assert "bigalign: interrupted; rerun the same command to resume" in p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert not (tmp_path / "t" / "zarr.json").exists()
    again = main_cli(*argv)  # the same command
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert np.array_equal(bigalign.Transform.load(str(tmp_path / "t")).rotation,
                          bigalign.fit(s, t, block_bytes=int(0.01 * 2**20)).rotation)


#: what pip's console-script wrapper for ``bigalign = bigalign.cli:main`` runs
SCRIPT = [sys.executable, "-c", "import sys; from bigalign.cli import main; sys.exit(main())"]


@pytest.mark.parametrize("entry", [SCRIPT, CLI], ids=["console-script", "python-m"])
def test_sigterm_during_startup_exits_130(tmp_path, entry):
    """A SIGTERM while the imports load (a scheduler stopping a job that just started) ends
    with 130 and one line, not by the signal (-15; 143 in a container). The fault point
    cli.start sends a real SIGTERM once the handler is in place, before numpy, Dask and
    Zarr are imported (the next test: importing the entry point loads none of them)."""
    p = subprocess.run([*entry, "info", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=120, env=dict(ENV, BIGALIGN_FAULTS="term:cli.start"))
    assert p.returncode == 130, (p.returncode, p.stderr)
    assert p.stderr == "bigalign: interrupted; rerun the same command to resume\n"


def test_entry_point_imports_nothing_heavy():
    """The console script's module (and ``import bigalign``) loads no numpy, Dask, Zarr or
    polars: the SIGTERM handler goes in first; ``bigalign --version`` answers without them."""
    code = ("import sys, bigalign, bigalign.cli; heavy = lambda: sorted(m for m in ('numpy', "
            "'dask', 'zarr', 'polars') if m in sys.modules); print(heavy()); "
            "bigalign.cli.main(['--version']); print(heavy()); bigalign.fit; print(heavy())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[:3] == ["[]", "bigalign 0.1.0", "[]"], p.stdout
    assert "dask" in lines[3] and "zarr" in lines[3]  # bigalign.fit loads them on first use


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["fit", "--help"],
                                  ["evaluate", "--help"], ["export", "--help"],
                                  ["plan", "apply", "--help"], ["registry", "gc", "--help"]])
def test_help_and_version_import_no_dask_or_zarr(argv):
    """``bigalign --help`` (every command's parser) and ``--version`` load no numpy, Dask,
    Zarr or polars (they took 0.4 s here, 1.4-2.2 s on a cold disk): the command modules
    import them in the functions that run a command. Checked in a fresh interpreter."""
    code = ("import sys; from bigalign.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'dask', 'zarr', 'polars', 'distributed') "
            "if m in sys.modules), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert p.returncode == 0, p.stderr
    assert "usage: bigalign" in p.stdout or p.stdout == "bigalign 0.1.0\n", p.stdout
    assert p.stderr.splitlines()[-1] == "[]", p.stderr


def test_lazy_package_names():
    from bigalign import RunReport, Transform, apply, fit  # noqa: F401
    assert bigalign.fit is fit and bigalign.Transform is Transform
    assert {"fit", "apply", "Transform", "run_status"} <= set(dir(bigalign))
    with pytest.raises(AttributeError):
        bigalign.no_such_name


def test_sigterm_handler_is_restored(done, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["info", done["tr"]]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


# ---- 3. status / info / transform arguments on the wrong kind of node ----------------------

def test_status_of_finished_outputs_exits_0(done):
    for path in (done["out"], done["tr"]):
        r = main_cli("status", path)
        assert r.returncode == 0, r.stderr
        assert "finished, nothing in flight" in r.stdout and "Traceback" not in r.stderr
    r = main_cli("status", done["out"], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["finished"] is True


def _status_json(path):
    r = main_cli("status", path, "--json")
    doc = json.loads(r.stdout)
    from bigalign.commands.status import STATUS_KEYS
    assert list(doc) == list(STATUS_KEYS), doc  # the same keys, in the same order, always
    return r.returncode, doc


def test_status_json_has_one_schema_in_every_state(done, tmp_path):
    """``status --json`` prints the same keys (README, "status schema") whether the job is
    finished, damaged, interrupted (a dead process), running (a live lease) or not started;
    a dead job has no ETA, in JSON or in words; the exit code says which (0, 3, 3, 3, 2)."""
    from bigalign.storage.job import Job

    code, doc = _status_json(done["out"])
    assert (code, doc["state"], doc["finished"], doc["kind"], doc["damaged"]) == \
        (0, "finished", True, "apply", None)
    assert doc["rows_done"] == doc["rows_total"] == 400 and doc["run_id"]
    code, doc = _status_json(done["tr"])
    assert (code, doc["state"], doc["kind"], doc["rows_total"]) == (0, "finished", "fit", 400)

    damaged = tmp_path / "damaged.zarr"
    assert main(["apply", done["tr"], done["s"], "-o", str(damaged), "-q"]) == 0
    os.remove(damaged / "c" / "3" / "0")
    code, doc = _status_json(damaged)
    assert (code, doc["state"], doc["finished"]) == (3, "damaged", False)
    assert "c/3/0" in doc["damaged"] and doc["kind"] == "apply"

    out = tmp_path / "killed.zarr"
    p = subprocess.run([*CLI, "apply", done["tr"], done["s"], "-o", str(out), "-q",
                        "--threads", "1"], capture_output=True, text=True, timeout=120,
                       env=dict(ENV, BIGALIGN_FAULTS="kill:apply.region-done@3"))
    assert p.returncode == -signal.SIGKILL, p.stderr
    code, doc = _status_json(out)
    assert (code, doc["state"], doc["running"], doc["kind"]) == (3, "interrupted", False, "apply")
    assert doc["eta_seconds"] is None and doc["rows_total"] == 400
    assert 0 < doc["units_done"] < doc["units_total"] and doc["checkpoint"]
    assert bigalign.run_status(str(out))["eta_seconds"] is None  # the Python API's too
    text, info = main_cli("status", out), main_cli("info", out)
    assert text.returncode == 3 and "left" not in text.stdout and "not running" in text.stdout
    assert info.returncode == 3 and "left" not in info.stdout and "not running" in info.stdout
    assert f"{doc['units_done']} of {doc['units_total']} units done" in text.stdout

    lease = Job(doc["checkpoint"]).lease(ttl=60).__enter__()  # a live process holds the job
    try:
        code, doc = _status_json(out)
        assert (code, doc["state"], doc["running"]) == (3, "running", True)
        assert doc["run_id"] and doc["units_done"] > 0
    finally:
        lease.__exit__(None, None, None)

    code, doc = _status_json(tmp_path / "nothing")
    assert code == 2 and doc["state"] == "not-started" and doc["kind"] is None
    assert doc["path"] == str(tmp_path / "nothing") and doc["finished"] is False


def test_embedding_array_where_a_transform_belongs_exits_2(done):
    message = f"{done['s']!r} is a Zarr array of shape (400, 6), not a bigalign transform"
    for argv in (["apply", done["s"], done["s"], "-o", done["dir"] / "x.zarr"],
                 ["evaluate", done["s"], done["s"], done["t"]]):
        r = main_cli(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(InputError, match=r"is a Zarr array of shape \(400, 6\)"):
        bigalign.Transform.load(done["s"])


def test_status_of_nothing_exits_2(tmp_path):
    r = main_cli("status", tmp_path / "nothing")
    assert r.returncode == 2 and "no progress recorded and no finished output" in r.stderr


# ---- 4. output cut short by its reader ------------------------------------------------------

def _closed_pipe_run(*argv):
    """Run with stdout a real pipe whose reader is already gone: every write gets EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*CLI, *map(str, argv)], env=ENV, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)


def test_closed_stdout_is_no_error(done):
    for argv, code in ((["info", done["tr"], "--json"], 0), (["fit", "--help"], 0),
                       (["status", done["out"]], 0), (["--version"], 0)):
        r = _closed_pipe_run(*argv)
        assert r.returncode == code, (argv, r.stderr)
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, (argv, r.stderr)
        assert r.stderr == "", (argv, r.stderr)


def test_piped_into_head(done):
    cmd = " ".join([*CLI, "info", done["tr"], "--json"])
    r = subprocess.run(["bash", "-o", "pipefail", "-c", f"{cmd} | head -1"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "{\n" and r.stderr == "", r.stderr


# ---- 5. row ranges are not clipped -----------------------------------------------------------

def test_rows_past_the_end_exit_2(done):
    r = main_cli("fit", done["s"], done["t"], "-o", done["dir"] / "r", "--rows", "0:5000", "-q")
    assert r.returncode == 2
    assert "row range 0:5000: stop 5000 is outside the array's 400 rows" in r.stderr
    assert not (done["dir"] / "r").exists()


# ---- 6. nested storage options ---------------------------------------------------------------

def test_storage_options_nested_json():
    ns = argparse.Namespace(storage_option=[
        'client_kwargs={"region_name": "us-east-1"}',
        'config_kwargs={"s3": {"addressing_style": "path"}}', "anon=TRUE", "port=9000",
        'token="123"', "name=abc", "endpoint_url=http://x:1/?a=b"],
        storage_options=['{"key": "k", "anon": false}', '{"secret": "s"}'])
    assert storage_options(ns) == {
        "client_kwargs": {"region_name": "us-east-1"},
        "config_kwargs": {"s3": {"addressing_style": "path"}}, "anon": True, "port": 9000,
        "token": "123", "name": "abc", "endpoint_url": "http://x:1/?a=b", "key": "k",
        "secret": "s"}
    for bad, message in ((["x={oops"], "not valid JSON"),):
        with pytest.raises(InputError, match=message):
            storage_options(argparse.Namespace(storage_option=bad, storage_options=[]))
    for blob in ("[1, 2]", "{bad"):
        with pytest.raises(InputError, match="--storage-options"):
            storage_options(argparse.Namespace(storage_option=[], storage_options=[blob]))


# ---- 7. quiet and JSON summaries -------------------------------------------------------------

def test_quiet_prints_nothing_json_prints_a_summary(done, tmp_path):
    r = main_cli("fit", done["s"], done["t"], "-o", tmp_path / "q", "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = main_cli("fit", done["s"], done["t"], "-o", tmp_path / "j", "--center", "--json", "-q")
    summary = json.loads(r.stdout)
    assert summary["kind"] == "transform" and summary["metadata"]["n_pairs"] == 400
    assert summary["dims"] == [6, 6] and summary["options"]["center"] is True
    r = main_cli("apply", tmp_path / "j", done["s"], "-o", tmp_path / "o.zarr", "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = main_cli("apply", tmp_path / "j", done["s"], "-o", tmp_path / "p.zarr", "--json")
    summary = json.loads(r.stdout)
    assert r.returncode == 0 and summary["complete"] is True and summary["rows"] == 400
    r = main_cli("fit", done["s"], done["t"], "-o", tmp_path / "v")
    assert r.returncode == 0 and "maps 6 -> 6 dims, fitted on 400 pairs" in r.stdout


@pytest.mark.parametrize("command", ["import", "invert", "compose", "export", "demo"])
def test_quiet_prints_no_summary_for_any_command(done, tmp_path, capsys, command):
    """-q means no summary on stdout for every command that writes something, as for fit
    and apply: on a first run and on a rerun with nothing to do. Without it, a summary."""
    np.save(tmp_path / "v.npy", np.ones((20, 4), np.float32))
    argv = {"import": ["import", tmp_path / "v.npy", "-o"],
            "invert": ["invert", done["tr"], "-o"],
            "compose": ["compose", done["tr"], done["tr"], "-o"],
            "export": ["export", done["tr"], "-o"],
            "demo": ["demo", "--rows", "2000", "--dim", "8", "--workdir"]}[command]
    suffix = ".npz" if command == "export" else ""  # the export's format
    for _ in ("a first run", "a rerun"):
        code, out, err = run(capsys, *argv, tmp_path / f"quiet{suffix}", "-q")
        assert code == 0 and out == "", (out, err)
    code, out, err = run(capsys, *argv, tmp_path / f"loud{suffix}")
    assert code == 0 and out.strip(), err


def test_import_json_prints_its_summary(tmp_path, capsys):
    """--json (every command that runs a job has it) prints a JSON summary for import too,
    with or without -q, on a first run and on a rerun."""
    np.save(tmp_path / "v.npy", np.ones((20, 4), np.float32))
    for extra, again in (([], False), (["-q"], True)):
        code, out, err = run(capsys, "import", tmp_path / "v.npy", "-o", tmp_path / "s",
                             "--json", *extra)
        doc = json.loads(out)
        assert code == 0 and doc["kind"] == "embedding-store" and doc["rows"] == 20, err
        assert doc["already_complete"] is again and doc["complete"]


# ---- 8. progress in log files ----------------------------------------------------------------

def test_progress_is_line_based_when_stderr_is_not_a_terminal(tmp_path):
    a, b, _ = planted(4000, 8, seed=8)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    r = cli("fit", s, t, "-o", tmp_path / "t", "--block-mb", "0.01")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("bigalign: progress ")]
    assert len(lines) >= 5, r.stderr
    assert "% (" in lines[0] and " tasks) after " in lines[0]
    assert lines[-1].startswith("bigalign: progress 100% (")


@pytest.mark.parametrize("command", ["fit", "apply"])
def test_the_first_log_line_counts_the_tasks_the_progress_counts(done, tmp_path, command):
    """The run's first line says "in N tasks" with the N of the progress lines' "of N
    tasks" (it said 8 then 9: the reading tasks, then every task); counts are singular at 1
    ("1 unit", not "1 units")."""
    import re

    argv = ["fit", done["s"], done["t"], "-o", tmp_path / "t"] if command == "fit" else \
        ["apply", done["tr"], done["s"], "-o", tmp_path / "o.zarr"]
    r = cli(*argv)
    assert r.returncode == 0, r.stderr
    first = re.search(rf"bigalign: {command}: .* in (\d+) tasks \((\d+) ", r.stderr)
    totals = set(re.findall(r"\(\d+ of (\d+) tasks\)", r.stderr))
    assert first and totals == {first.group(1)}, r.stderr
    assert int(first.group(2)) < int(first.group(1))  # the reading tasks, then merges/counts
    assert "1 units" not in r.stderr + r.stdout and "1 regions" not in r.stderr + r.stdout


def test_counts_and_significant_figures_in_words():
    from bigalign.words import counted, significant
    assert [counted(n, "region") for n in (0, 1, 2, 12345)] == \
        ["0 regions", "1 region", "2 regions", "12,345 regions"]
    assert counted(1, "query", "queries") == "1 query" and counted(3, "query", "queries") == \
        "3 queries"
    for x in (0.012345678912345, 1.2345678e-9, 123456.789, 0.5):
        assert float(significant(x)) == float(f"{x:.4g}") and len(significant(x)) < 10
    assert significant(None) == "?"


def test_progress_bar_on_a_terminal():
    from bigalign.execution.progress import Reporter

    class Terminal:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    term = Terminal()
    rep = Reporter(term)
    rep.update(5, 10)
    rep.update(10, 10, final=True)
    assert term.text.startswith("\r[") and "10 of 10 tasks" in term.text
    assert term.text.endswith("\n")


# ---- 9. float16 overflow ---------------------------------------------------------------------

def test_float16_overflow_exits_2_naming_the_row(tmp_path):
    x = np.ones((300, 4), np.float32)
    x[217] = 3e4  # maps to 3e4 * 3 = 9e4 > 65504
    s = write_zarr(tmp_path / "x.zarr", x, 100)
    bigalign.Transform(np.eye(4), np.zeros(4), np.zeros(4), 3.0).save(str(tmp_path / "t"))
    r = main_cli("apply", tmp_path / "t", s, "-o", tmp_path / "o.zarr", "--dtype", "float16", "-q")
    assert r.returncode == 2, r.stderr
    assert "source row 217" in r.stderr and "float16" in r.stderr
    assert not bigalign.output_status(str(tmp_path / "o.zarr"))["complete"]


def test_status_of_unreachable_storage_exits_75(capsys, monkeypatch):
    """'Nothing there' would be a lie when storage does not answer: exit 75, not 2."""
    pytest.importorskip("aiohttp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(stores, "RETRY_BACKOFF", 0.001)  # 4 tries, not 3.5 s of waits
    for command in ("status", "info"):
        code, _, err = run(capsys, command, f"http://127.0.0.1:{port}/out.zarr")
        assert code == 75, err
        assert "storage or cluster unavailable" in err and "Traceback" not in err


# ---- 7. execution settings and counts: refused up front, naming the flag (issue 16) --------

@pytest.mark.parametrize("argv,flag", [
    (["fit", "{s}", "{t}", "-o", "{o}", "--threads", "0"], "--threads"),
    (["fit", "{s}", "{t}", "-o", "{o}", "--threads", "-3"], "--threads"),
    (["apply", "{tr}", "{s}", "-o", "{o}", "--threads", "-3"], "--threads"),
    (["fit", "{s}", "{t}", "-o", "{o}", "--workers", "0"], "--workers"),
    (["fit", "{s}", "{t}", "-o", "{o}", "--block-mb", "0"], "--block-mb"),
    (["fit", "{s}", "{t}", "-o", "{o}", "--block-mb", "-5"], "--block-mb"),
    (["apply", "{tr}", "{s}", "-o", "{o}", "--chunk-rows", "0"], "--chunk-rows"),
    (["import", "{s}", "-o", "{o}", "--chunk-rows", "0"], "--chunk-rows"),
    (["evaluate", "{tr}", "{s}", "{t}", "--max-queries", "-1"], "--max-queries"),
    (["curve", "{s}", "{t}", "--max-queries", "-1"], "--max-queries"),
    (["demo", "--workers", "0", "--workdir", "{o}"], "--workers"),
    (["plan", "fit", "--rows", "1000", "--dims", "8", "--block-mb", "0"], "--block-mb"),
    (["realign", "{o}.toml", "--threads", "0"], "--threads"),
    (["realign", "{o}.toml", "--block-mb", "-5"], "--block-mb"),
])
def test_nonsense_counts_are_refused_naming_the_flag(done, capsys, tmp_path, argv, flag):
    """--threads 0, --block-mb -5, --chunk-rows 0 ... ran with defaults (or, --threads -3,
    died with a traceback after apply had created its output): a usage error, exit 2."""
    paths = dict(s=done["s"], t=done["t"], tr=done["tr"], o=str(tmp_path / "out"))
    with pytest.raises(SystemExit) as e:
        main([x.format(**paths) for x in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call,what", [
    (lambda d, o: bigalign.fit(d["s"], d["t"], output=o, threads=0), "--threads"),
    (lambda d, o: bigalign.apply(d["tr"], d["s"], o, threads=-3), "--threads"),
    (lambda d, o: bigalign.apply(d["tr"], d["s"], o, workers=0), "--workers"),
    (lambda d, o: bigalign.apply(d["tr"], d["s"], o, block_bytes=0), "--block-mb"),
    (lambda d, o: bigalign.fit(d["s"], d["t"], output=o, memory_limit="banana", workers=1),
     "--memory-limit 'banana'"),
    (lambda d, o: bigalign.apply(d["tr"], d["s"], o, chunk_rows=0), "--chunk-rows"),
    (lambda d, o: bigalign.apply(d["tr"], d["s"], o, chunk_rows=-5), "--chunk-rows"),
])
def test_python_api_refuses_nonsense_settings_before_writing(done, tmp_path, call, what):
    """The same checks hold for the Python API (Execution validates itself when built, as
    every command builds one first): InputError, and no output or checkpoint left behind."""
    with pytest.raises(InputError, match=what.replace("'", ".")):
        call(done, str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_memory_limit_that_is_no_size_exits_2(done, capsys, tmp_path):
    code, out, err = run(capsys, "apply", done["tr"], done["s"], "-o", tmp_path / "o",
                         "--workers", "1", "--memory-limit", "banana")
    assert code == 2 and "--memory-limit 'banana'" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_max_queries_zero_still_means_all(done):
    from bigalign.maths.metrics import query_sample
    assert len(query_sample(50, 0, 0)) == 50 and len(query_sample(50, None, 0)) == 50
    with pytest.raises(InputError, match="--max-queries"):
        query_sample(50, -1, 0)


# ---- 8. damaged inputs: one line, exit 2, nothing created (issue 16 item 10) ---------------

def test_truncated_npy_is_refused_before_anything_is_created(capsys, tmp_path):
    """A .npy cut short (a copy that did not finish) was mapped: 'mmap length is greater
    than file size', a traceback, and an output and a checkpoint left behind."""
    path = tmp_path / "in" / "v.npy"
    path.parent.mkdir()
    np.save(path, np.ones((1000, 16), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    code, out, err = run(capsys, "import", path, "-o", tmp_path / "s.zarr")
    assert code == 2 and "Traceback" not in err, err
    assert "v.npy: truncated .npy file" in err and "(499 whole rows)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def _truncate(path, keep=30):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("argv,damage,named", [
    (["fit", "{store}", "{a}", "-o", "{o}"], "store/embeddings", "store/embeddings/zarr.json"),
    (["apply", "{tr}", "{store}", "-o", "{o}"], "store/ids", "store/ids/zarr.json"),
    (["export", "{store}", "--format", "parquet", "-o", "{o}"], "store/ids",
     "store/ids/zarr.json"),
    (["fit", "{a}", "{b}", "-o", "{o}"], "a.zarr", "a.zarr/zarr.json"),
    (["apply", "{tr}", "{a}", "-o", "{o}"], "t", "t/zarr.json"),
    (["apply", "{tr}", "{a}", "-o", "{o}"], "t/rotation", "t/rotation/zarr.json"),
])
def test_truncated_zarr_json_in_an_input_names_the_file(capsys, tmp_path, argv, damage, named):
    """A truncated zarr.json in an input gave JSONDecodeError with a traceback (exit 1)."""
    from conftest import make_store

    a, b, _ = planted(200, 4, seed=3)
    paths = dict(a=write_zarr(tmp_path / "a.zarr", a, 50), b=write_zarr(tmp_path / "b.zarr", b, 50),
                 store=make_store(tmp_path / "store", a, ids=np.arange(200), model="m"),
                 tr=str(tmp_path / "t"), o=str(tmp_path / "out"))
    assert main(["fit", paths["a"], paths["b"], "-o", paths["tr"], "-q"]) == 0
    capsys.readouterr()
    _truncate(tmp_path / damage / "zarr.json")
    code, out, err = run(capsys, *[x.format(**paths) for x in argv])
    assert code == 2 and "Traceback" not in err, err
    assert f"the Zarr metadata '{tmp_path / named}' is not valid JSON" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()


def test_export_on_a_full_disk_exits_2_naming_the_file(done, capsys, tmp_path, monkeypatch):
    """polars reports a full disk as a ComputeError ("No space left on device (os error
    28)"): that was a traceback, exit 1. Now one line naming the file, exit 2, no temporary
    file left, and the rerun (space freed) finishes the export."""
    import polars as pl

    from bigalign.commands import parquet_export

    real, calls = parquet_export._sink, {"n": 0}

    def full_disk(frames, spec, target, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(frames, spec, target, *a, **kw)
        with open(target, "wb") as f:  # a partial file, as the real writer leaves
            f.write(b"PAR1")
        raise pl.exceptions.ComputeError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(parquet_export, "_sink", full_disk)
    out = tmp_path / "export"
    argv = ["export", done["out"], "--format", "parquet", "-o", out, "--rows-per-file", "100",
            "--threads", "1", "-q"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err, err
    assert "cannot write " + str(out / "_in_progress" / "part-") in err and "no space left" in err, err
    assert not [p for d in (out, out / "_in_progress") for p in d.iterdir()
                if ".tmp" in p.name or p.name.startswith(".")]
    monkeypatch.setattr(parquet_export, "_sink", real)
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert len(list(out.glob("*.parquet"))) == 4


def test_disk_full_is_recognised_by_errno_or_text():
    from bigalign.errors import is_disk_full
    assert is_disk_full(OSError(errno.ENOSPC, "x")) and is_disk_full(OSError(errno.EDQUOT, "x"))
    assert is_disk_full(RuntimeError("I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EIO, "x")) and not is_disk_full(ValueError("x"))


def test_fit_that_cannot_fit_in_memory_is_refused_before_writing(capsys, tmp_path, monkeypatch):
    """4 x 100,000-dim arrays: the plan needs ~1.1 TiB per task (float64 d x d partials);
    the fit started anyway and died with 'MemoryError: 74.5 GiB' (exit 1). Now refused up
    front, naming the planned and the available sizes and what to do."""
    from bigalign import options

    monkeypatch.setattr(options, "machine_memory", lambda: 64 * 2**30)
    a = write_zarr(tmp_path / "a.zarr", np.ones((4, 100_000), np.float32), 4)
    b = write_zarr(tmp_path / "b.zarr", np.ones((4, 100_000), np.float32), 4)
    code, out, err = run(capsys, "fit", a, b, "-o", tmp_path / "t")
    assert code == 2 and "Traceback" not in err, err
    assert "needs ~1.1 TiB of memory per task as planned, but this machine's memory is " \
           "64.0 GiB" in err and "bigalign plan fit" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr"]


def test_fit_beyond_the_workers_memory_limit_is_refused(done, capsys, tmp_path):
    """--memory-limit is what each worker has: a task planned above it is refused before a
    cluster is started or anything written."""
    code, out, err = run(capsys, "fit", done["s"], done["t"], "-o", tmp_path / "t",
                         "--workers", "2", "--memory-limit", "10kB")
    assert code == 2 and "the --memory-limit of each worker (10kB) is 9.8 KiB" in err, err
    assert list(tmp_path.iterdir()) == []


# ---- 9. a mistyped storage option is named (issue 16 item 12) ------------------------------

@pytest.mark.parametrize("argv,named", [
    (["apply", "s3://bucket/t", "{s}", "-o", "{o}", "--storage-option", "bogus_opt=1"],
     "--storage-option bogus_opt: not an option of the s3 filesystem"),
    (["fit", "s3://bucket/a.zarr", "{s}", "-o", "{o}", "--storage-option", "bogus_opt=1"],
     "--storage-option bogus_opt: not an option of the s3 filesystem"),
    (["info", "s3://bucket/t", "--storage-option", 'client_kwargs={{"bogus": 1}}'],
     "--storage-option client_kwargs: 'bogus' is not an option there"),
])
def test_mistyped_storage_option_is_named(done, capsys, tmp_path, argv, named):
    """s3fs takes any keyword and aiobotocore refuses it at the first request: that read
    "'s3://...' is not a bigalign transform (TypeError: AioSession.__init__() got an
    unexpected keyword argument 'bogus_opt')". No request is made to find out."""
    pytest.importorskip("s3fs")
    code, out, err = run(capsys, *[x.format(s=done["s"], o=tmp_path / "o") for x in argv])
    assert code == 2 and named in err, err
    assert "not a bigalign transform" not in err and "not a readable" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_mistyped_storage_option_in_the_python_api(done, tmp_path):
    pytest.importorskip("s3fs")
    with pytest.raises(InputError, match="^--storage-option bogus_opt: not an option of the s3"):
        bigalign.apply("s3://bucket/t", done["s"], str(tmp_path / "o"),
                       storage_options={"bogus_opt": 1})
    with pytest.raises(InputError, match="^--storage-option bogus_opt: not an option of the s3"):
        bigalign.fit("s3://bucket/a.zarr", done["s"], storage_options={"bogus_opt": 1})
