import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.cli import main
from conftest import imported_store, main_cli, planted, write_zarr


@pytest.fixture
def files(tmp_path):
    a, b, _ = planted(400, 6, noise=0.1, offset_b=2.0)
    return (write_zarr(tmp_path / "a.zarr", a, 50), write_zarr(tmp_path / "b.zarr", b, 50),
            tmp_path, a)


def run(capsys, *argv):
    code = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_apply_info_roundtrip(files, capsys):
    s, t, tmp, a = files
    code, out, _ = run(capsys, "fit", s, t, "-o", tmp / "t", "--center")
    assert code == 0 and "maps 6 -> 6 dims, fitted on 400 pairs" in out
    code, out, _ = run(capsys, "apply", tmp / "t", s, "-o", tmp / "o.zarr")
    assert code == 0 and "wrote 400 rows" in out and "marked complete" in out
    code, out, _ = run(capsys, "info", tmp / "t", "--json")
    meta = json.loads(out)
    assert code == 0 and meta["metadata"]["n_pairs"] == 400 and meta["options"]["center"]
    assert "epsilon" in meta["metadata"]["discrepancy"]
    code, out, _ = run(capsys, "info", tmp / "o.zarr")
    assert code == 0 and "complete" in out


def test_residual_in_words_has_four_significant_digits_json_all(files, capsys):
    """``info`` printed the relative residual with 16 digits; people get ~4, ``--json``
    every digit (the stored float64, compared with the transform's own metadata)."""
    import re

    s, t, tmp, a = files
    assert main(["fit", s, t, "-o", str(tmp / "t4"), "-q"]) == 0
    exact = bigalign.Transform.load(str(tmp / "t4")).metadata["relative_residual"]
    capsys.readouterr()
    code, out, _ = run(capsys, "info", tmp / "t4")
    shown = re.search(r"train relative residual .* = (\S+)", out).group(1)
    assert code == 0 and shown == f"{exact:.4g}" and len(shown.replace("e-", "")) <= 9
    code, out, _ = run(capsys, "info", tmp / "t4", "--json")
    assert json.loads(out)["metadata"]["relative_residual"] == exact


@pytest.mark.parametrize("argv,message", [
    (["fit", "{tmp}/missing.zarr", "{t}", "-o", "{tmp}/x"], "source '.*missing.zarr': no such Zarr array"),
    (["fit", "{s}", "{short}", "-o", "{tmp}/x"], "source has 400 rows but target has 300"),
    (["fit", "{s}", "{ints}", "-o", "{tmp}/x"], "dtype int32 is not float"),
    (["fit", "{s}", "{empty}", "-o", "{tmp}/x"], "empty array"),
    (["fit", "{s}", "{t}", "-o", "{tmp}/x", "--rows", "500:600"], "start 500 is outside the array's 400 rows"),
    (["fit", "{s}", "{t}", "-o", "{tmp}/x", "--rows", "300:200"], "empty for an array of 400"),
    (["fit", "{s}", "{t}", "-o", "{tmp}/x", "--rows=-500:"], "start -500 is outside"),
    (["fit", "{s}", "{t}", "-o", "{tmp}/x", "--storage-option", "k={{bad"], "not valid JSON"),
    (["fit", "{s}", "{wide}", "-o", "{tmp}/x", "--no-reflection"], "needs equal dimensions"),
    (["fit", "{s}", "{t}", "-o", "{s}"], "never writes over its inputs"),
    (["apply", "{tmp}/nothing", "{s}", "-o", "{tmp}/y"], "not a transform|no transform"),
    (["info", "{tmp}/nothing"], r"'.*nothing' does not exist \(info describes transforms, "
                                r"apply outputs, embedding stores, Parquet export folders"),
    (["info", "{tmp}"], "is a folder bigalign did not write: not a transform, apply output"),
    (["info", "{group}"], "is a Zarr group bigalign did not write, holding no 'embeddings'"),
    (["info", "{npy}"], r"is a NumPy \.npy file of vectors, not a bigalign output: 'bigalign "
                        r"import .*x\.npy -o STORE' makes an embedding store of it"),
    (["info", "{fvecs}"], r"is an \.fvecs file of vectors.*'bigalign import .*x\.fvecs -o"),
])
def test_bad_input_exit_2_with_message(files, capsys, argv, message):
    s, t, tmp, a = files
    paths = dict(s=s, t=t, tmp=tmp,
                 short=write_zarr(tmp / "short.zarr", a[:300], 50),
                 ints=write_zarr(tmp / "ints.zarr", a.astype(np.int32), 50),
                 wide=write_zarr(tmp / "wide.zarr", np.ones((400, 8), np.float32), 50))
    zarr.create_array(str(tmp / "empty.zarr"), shape=(0, 6), dtype="f4")
    paths["empty"] = str(tmp / "empty.zarr")
    zarr.open_group(str(tmp / "group.zarr"), mode="w")
    paths["group"] = str(tmp / "group.zarr")
    np.save(tmp / "x.npy", a)
    (tmp / "x.fvecs").write_bytes(b"")
    paths.update(npy=str(tmp / "x.npy"), fvecs=str(tmp / "x.fvecs"))
    code, out, err = run(capsys, *[x.format(**paths) for x in argv])
    assert code == 2
    assert "error:" in err
    import re
    assert re.search(message, err), err


def test_info_of_an_embedding_store_a_user_made(capsys, tmp_path):
    """A user's group holding embeddings, ids and a model stamp is an input to every
    command, so info describes it too (it said 'not a transform or apply output')."""
    g = zarr.open_group(str(tmp_path / "u.zarr"), mode="w")
    g.attrs["model"] = "minilm"
    g.create_array("embeddings", data=np.ones((100, 8), np.float32), chunks=(50, 8))
    g.create_array("ids", data=np.arange(100) * 3, chunks=(50,))
    code, out, err = run(capsys, "info", tmp_path / "u.zarr")
    assert code == 0, err
    assert "100 rows x 8 (float32), ids: int64, model: minilm; usable as an input" in out
    code, out, _ = run(capsys, "info", tmp_path / "u.zarr", "--json")
    doc = json.loads(out)
    assert doc["kind"] == "embedding-store" and doc["made_by"] is None and doc["rows"] == 100


def test_info_of_a_file_and_of_a_bare_array(files, capsys, tmp_path):
    """A regular file: said to be a file (not a failed read of a manifest inside it); a
    bare Zarr array, which every command takes: described (shape, dtype, chunks)."""
    s, t, tmp, a = files
    (tmp_path / "v.parquet").write_bytes(b"PAR1")
    code, out, err = run(capsys, "info", tmp_path / "v.parquet")
    assert code == 2 and "is a Parquet file of vectors, not a bigalign output: 'bigalign " \
        f"import {tmp_path / 'v.parquet'} -o STORE'" in err
    (tmp_path / "notes.txt").write_text("x")
    code, out, err = run(capsys, "info", tmp_path / "notes.txt")
    assert code == 2 and "is a file, not a bigalign output or Zarr store" in err
    assert "NotADirectoryError" not in err and "manifest" not in err
    code, out, err = run(capsys, "info", s)
    assert code == 0 and "shape (400, 6), float32, chunks (50, 6)" in out
    assert "usable as an input" in out
    code, out, _ = run(capsys, "info", s, "--json")
    assert json.loads(out) == {"kind": "zarr-array", "path": s, "shape": [400, 6],
                               "dtype": "float32", "chunks": [50, 6], "shards": None,
                               "unusable": None}
    code, out, _ = run(capsys, "info", write_zarr(tmp_path / "i.zarr",
                                                  a.astype(np.int32), 50))
    assert code == 0 and "not usable as an input" in out and "dtype int32" in out


def test_nan_while_streaming_exit_2_names_rows(files, capsys):
    s, t, tmp, a = files
    a = a.copy()
    a[123, 0] = np.inf
    bad = write_zarr(tmp / "bad.zarr", a, 50)
    code, _, err = run(capsys, "fit", bad, t, "-o", tmp / "t", "-q")
    assert code == 2 and "source row 123 holds NaN or Inf" in err
    assert not (tmp / "t").exists()  # nothing that looks finished


def test_zero_norm_with_normalize(files, capsys):
    s, t, tmp, a = files
    a = a.copy()
    a[77] = 0
    bad = write_zarr(tmp / "z.zarr", a, 50)
    code, _, err = run(capsys, "fit", bad, t, "-o", tmp / "t", "--normalize", "-q")
    assert code == 2 and "source row 77 holds a zero-norm row" in err


def test_help_explains_center(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # wrapped as in a pipe, whatever the terminal
    out = main_cli("fit", "--help")
    assert out.returncode == 0 and "--center" in out.stdout and "common offset" in out.stdout


@pytest.mark.parametrize("argv,usage,named", [
    (["fit", "a", "b", "-o", "t", "--centre"], "usage: bigalign fit ",
     "unrecognized arguments: --centre (did you mean --center?)"),
    (["apply", "t", "a", "-o", "o", "extra"], "usage: bigalign apply ",
     "unrecognized arguments: extra"),
    (["registry", "list", "r", "--bogus"], "usage: bigalign registry list ",
     "unrecognized arguments: --bogus"),
], ids=["fit-typo", "apply-extra-positional", "registry-action"])
def test_unknown_option_shows_the_subcommands_usage(capsys, argv, usage, named):
    """A mistyped option is reported with the usage of the command it was given to (not
    the top level's 'bigalign COMMAND ...') and named, exit 2, before anything runs."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and named in err, err


def test_real_exit_code_and_demo(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "bigalign.cli", "fit", str(tmp_path / "no"),
                          str(tmp_path / "no2"), "-o", str(tmp_path / "t")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such Zarr array" in bad.stderr
    demo = main_cli("demo", "--rows", "20000", "--dim", "32", "--workdir", tmp_path / "d")
    assert demo.returncode == 0, demo.stderr
    assert "recovered rotation" in demo.stdout and "demo OK" in demo.stdout
    import re  # the planted offsets: the uncentred fit's residual is far above the centred one
    centred, uncentred = map(float, re.search(r"centred ([\d.]+), uncentred ([\d.]+)",
                                              demo.stdout).groups())
    assert uncentred > 5 * centred, demo.stdout


DEMO = ("demo", "--rows", "2000", "--dim", "8", "-q")


def _snapshot(folder):
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("occupant,named", [
    ("user folder at source.zarr", "source.zarr"),
    ("plain file at target.zarr", "target.zarr"),
    ("user Zarr array at target.zarr", "target.zarr"),
    ("imported store as workdir", "w"),
])
def test_demo_refuses_paths_it_did_not_write(tmp_path, capsys, occupant, named):
    """The demo writes over nothing but an earlier demo's outputs: anything else at a path
    it writes (or a workdir inside a Zarr node) is refused up front, naming the path, and
    the workdir is left exactly as it was."""
    w = tmp_path / "w"
    w.mkdir()
    if occupant == "user folder at source.zarr":
        (w / "source.zarr").mkdir()
        (w / "source.zarr" / "notes.txt").write_text("precious")
    elif occupant == "plain file at target.zarr":
        (w / "target.zarr").write_text("precious")
    elif occupant == "user Zarr array at target.zarr":
        write_zarr(w / "target.zarr", np.ones((30, 4), np.float16), 10)
    else:
        w.rmdir()
        imported_store(w, np.ones((30, 4), np.float32), chunk_rows=10)
    before = _snapshot(w)
    code, out, err = run(capsys, *DEMO, "--workdir", w)
    assert code == 2 and "error:" in err and named in err, err
    assert _snapshot(w) == before


def test_demo_rerun_in_its_workdir_replaces_its_own_outputs(tmp_path, capsys):
    """What an earlier demo wrote is the demo's to replace: its arrays are marked as demo
    data, and a rerun (other sizes, the workdir spelled another way) succeeds and leaves
    the new data. Other commands do not write over demo data."""
    from bigalign.storage.outputs import inspect

    w = tmp_path / "w"
    assert run(capsys, *DEMO, "--workdir", w)[0] == 0
    code, _, err = run(capsys, "demo", "--rows", "3000", "--dim", "4", "-q", "--workdir",
                       f"{w}/../w/")
    assert code == 0, err
    assert zarr.open_array(str(w / "target.zarr"), mode="r").shape == (3000, 4)
    assert sorted(p.name for p in w.iterdir()) == ["aligned.zarr", "source.zarr",
                                                    "target.zarr", "transform"]
    assert {inspect(w / n).kind for n in ("source.zarr", "target.zarr")} == {"demo-data"}
    code, _, err = run(capsys, "fit", w / "target.zarr", w / "aligned.zarr", "-o",
                       w / "source.zarr", "--overwrite", "-q")
    assert code == 2 and "only 'bigalign demo' does" in err, err


def test_storage_option_parsing():
    import argparse
    from bigalign.cli import storage_options
    from bigalign.errors import InputError
    ns = argparse.Namespace(storage_option=["anon=True", "port=9000", "endpoint_url=http://x:1",
                                            "token=null", "name=abc"])
    assert storage_options(ns) == {"anon": True, "port": 9000, "endpoint_url": "http://x:1",
                                   "token": None, "name": "abc"}
    assert storage_options(argparse.Namespace(storage_option=[])) is None
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        storage_options(argparse.Namespace(storage_option=["novalue"]))


def test_apply_json_names_the_kind_of_output(tmp_path, capsys):
    """apply --json says what it wrote: a bare array for an array source, an embedding
    store (with the source's ids) for a store source."""
    a, b, _ = planted(600, 6, seed=12)
    ids = np.arange(600) * 7
    s = imported_store(tmp_path / "a.store", a, ids, chunk_rows=100)
    t = imported_store(tmp_path / "b.store", b, ids, chunk_rows=100)
    assert main(["fit", s, t, "-o", str(tmp_path / "t"), "--center", "-q"]) == 0
    kinds = {}
    for name, src in (("array", f"{s}/embeddings"), ("store", s)):
        capsys.readouterr()
        assert main(["apply", str(tmp_path / "t"), src, "-o", str(tmp_path / f"{name}.out"),
                     "--json"]) == 0
        kinds[name] = json.loads(capsys.readouterr().out)["kind"]
    assert kinds == {"array": "apply-output", "store": "apply-store"}


def test_python_warnings_print_as_one_line(tmp_path):
    """The fit's NotUniqueWarning (fewer pairs than dims) on the command line: one line
    'bigalign: warning: ...', not the file:line, category and source line of Python's
    default format."""
    a, b, _ = planted(10, 16, seed=3)
    s, t = write_zarr(tmp_path / "a.zarr", a, 5), write_zarr(tmp_path / "b.zarr", b, 5)
    r = main_cli("fit", s, t, "-o", tmp_path / "t", "-q", check=0)
    lines = r.stderr.splitlines()
    assert any(line.startswith("bigalign: warning: 10 pairs for dimensions 16x16")
               for line in lines), r.stderr
    assert "NotUniqueWarning" not in r.stderr and ".py:" not in r.stderr
    assert "procrustes(" not in r.stderr


def test_readable_info_invert_compose_and_apply_rerun(files, capsys):
    """info of a composed transform leaves out the residual it has none of; invert says
    the inverse's kind once; info of a bare apply output prints readable fields, not the
    raw job record; an apply rerun says 'nothing to do' once (stderr), not twice."""
    s, t, tmp, a = files
    assert run(capsys, "fit", s, t, "-o", tmp / "t", "-q")[0] == 0
    code, out, _ = run(capsys, "invert", tmp / "t", "-o", tmp / "inv")
    assert code == 0 and "exact inverse" in out and "exact: exact" not in out
    assert run(capsys, "compose", tmp / "t", tmp / "inv", "-o", tmp / "c")[0] == 0
    code, out, _ = run(capsys, "info", tmp / "c")
    assert code == 0 and "None" not in out and "relative residual" not in out
    assert run(capsys, "apply", tmp / "t", s, "-o", tmp / "o.zarr", "-q")[0] == 0
    code, out, _ = run(capsys, "info", tmp / "o.zarr")
    assert code == 0 and "400 rows mapped from" in out and "rows 0:400" in out
    assert "{" not in out and "job" not in out and "None" not in out
    code, out, err = run(capsys, "apply", tmp / "t", s, "-o", tmp / "o.zarr")
    assert code == 0 and (out + err).count("nothing to do") == 1, (out, err)


def test_info_and_status_help_describe_their_path(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Describe what is at path" in out and "a Parquet export folder, a Zarr array" in out
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    assert "embedding store or Parquet export folder" in " ".join(capsys.readouterr().out.split())
