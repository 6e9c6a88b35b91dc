"""workflows/: every file parses, and every bigalign command line in it (container args,
shell scripts, Python lists) is accepted by the real CLI parser; the realign set-ups map
the exit codes as the README says (4 fails the job, 75 and 130 retry).

PyYAML comes with dask (a dependency), so no extra test dependency is needed."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from bigalign.cli import build_parser
from bigalign.commands.realign_config import load_config

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
YAMLS = sorted(WORKFLOWS.glob("*.yaml"))
PLACEHOLDER = "1"  # for $(VAR), {{...}}, "$var": parses as a path, a number and a name


def _value(token: str) -> str:
    return PLACEHOLDER if ("$" in token or "{{" in token) else token


def check(argv: list[str], where: str):
    """Parse ``argv`` (after ``bigalign``) with the CLI's parser; fail naming ``where``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: 'bigalign {' '.join(argv)}' is rejected by the CLI parser "
                    f"(exit {e.code}): {err.getvalue().strip()}")


def shell_invocations(script: str) -> list[list[str]]:
    """The bigalign command lines of a shell script: continuations joined, redirections
    dropped, each command cut at the first shell operator; array expansions ("${a[@]}",
    options of their own) are left out, other variables become placeholders."""
    script = script.replace("\\\n", " ")
    out = []
    for line in script.splitlines():
        line = line.split(" #", 1)[0]
        for match in re.finditer(r"(?:^|[\s;|&(!])bigalign\s", line):
            rest = re.sub(r"\s\d*>>?&?\s*[^\s;|&()]+", " ", line[match.end():])
            lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            argv = []
            for token in lexer:
                if token and set(token) <= set("();<>|&"):
                    break
                if "[@]" in token:
                    continue
                argv.append(_value(token))
            out.append(argv)
    return out


def python_invocations(source: str) -> list[list[str]]:
    """List literals starting with "bigalign" in a Python file, plus the += extensions of
    the variable they are assigned to; names and expressions become placeholders."""
    tree = ast.parse(source)
    found: dict[str, list[str]] = {}
    order = []

    def words(node):
        return [n.value if isinstance(n, ast.Constant) and isinstance(n.value, str)
                else PLACEHOLDER for n in node.elts]

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and \
                node.value.elts and isinstance(node.value.elts[0], ast.Constant) and \
                node.value.elts[0].value == "bigalign":
            name = node.targets[0].id if isinstance(node.targets[0], ast.Name) else None
            argv = words(node.value)[1:]
            if name:
                found[name] = argv
            order.append((name, argv))
    for node in ast.walk(tree):  # command += ["--flag", value]
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and \
                node.target.id in found and isinstance(node.value, ast.List):
            found[node.target.id] += words(node.value)
    return [found[name] if name else argv for name, argv in order]


def containers(doc) -> list[dict]:
    """Every container spec in a manifest: pod specs' containers and Argo templates'
    container, wherever they are nested."""
    out = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                out += [c for c in value if isinstance(c, dict)]
            elif key == "container" and isinstance(value, dict):
                out.append(value)
            else:
                out += containers(value)
    elif isinstance(doc, list):
        for item in doc:
            out += containers(item)
    return out


def yaml_invocations(docs) -> list[list[str]]:
    out = []
    for c in containers(docs):
        command, args = list(c.get("command") or []), [str(a) for a in c.get("args") or []]
        if not command and "bigalign" in str(c.get("image", "")):  # entrypoint: bigalign
            if args and args[0] not in ("dask", "dask-worker", "dask-scheduler"):
                out.append([_value(a) for a in args])
        elif command[:1] == ["bigalign"]:
            out.append([_value(a) for a in command[1:] + args])
        elif len(command) >= 2 and command[0] in ("/bin/sh", "sh", "/bin/bash", "bash") \
                and command[1] == "-c":
            out += shell_invocations(" ".join(command[2:] + args))
    return out


def test_every_workflow_file_is_checked():
    names = {p.name for p in WORKFLOWS.iterdir() if p.is_file()}
    checked = {p.name for p in YAMLS} | {"migrate.sh", "slurm_dask_jobqueue.py",
                                         "slurm_cluster.py", "slurm_realign.py",
                                         "realign.toml", "README.md"}
    assert names <= checked, f"workflows/ files this test does not check: {names - checked}"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_bigalign_invocations_parse(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name}: no YAML documents"
    invocations = yaml_invocations(docs)
    assert invocations, f"{path.name}: no bigalign invocation found"
    for argv in invocations:
        check(argv, path.name)


def test_shell_and_python_invocations_parse():
    sh = shell_invocations((WORKFLOWS / "migrate.sh").read_text())
    assert [a[0] for a in sh] == ["info", "fit", "evaluate", "apply", "info"]
    for argv in sh:
        check(argv, "migrate.sh")
    (cmd,) = python_invocations((WORKFLOWS / "slurm_realign.py").read_text())
    args = check(cmd, "slurm_realign.py")
    assert args.command == "realign" and args.scheduler and args.summary and args.run_id
    for path in WORKFLOWS.glob("*.py"):  # and every Python file at least compiles
        ast.parse(path.read_text())


def test_the_example_configuration_is_valid():
    cfg = load_config(WORKFLOWS / "realign.toml")
    assert cfg.registry.startswith("s3://") and cfg.apply and "{version}" in cfg.apply.output
    assert cfg.gate.min_recall_at_10 is not None and cfg.gate.not_worse_than_current


def _realign_args(docs):
    (argv,) = [a for a in yaml_invocations(docs) if a[0] == "realign"]
    return argv, build_parser().parse_args(argv)


def test_cronjob_maps_the_exit_codes():
    docs = list(yaml.safe_load_all((WORKFLOWS / "k8s-cronjob-realign.yaml").read_text()))
    (cron,) = [d for d in docs if d and d.get("kind") == "CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    actions = {}
    for rule in job["podFailurePolicy"]["rules"]:
        for code in (rule.get("onExitCodes") or {}).get("values", []):
            actions.setdefault(code, rule["action"])  # rules apply in order
    assert actions[4] == actions[2] == actions[1] == "FailJob"
    assert actions[75] in ("Count", "Ignore") and actions[130] in ("Count", "Ignore")
    (container,) = job["template"]["spec"]["containers"]
    assert all(r["onExitCodes"]["containerName"] == container["name"]
               for r in job["podFailurePolicy"]["rules"] if "onExitCodes" in r)
    argv, args = _realign_args(docs)
    assert args.run_id and args.summary and args.wait >= 150  # > the 120 s lease


def test_argo_cronworkflow_forbids_overlap_and_exports_the_summary():
    docs = list(yaml.safe_load_all((WORKFLOWS / "argo-cronworkflow-realign.yaml").read_text()))
    (cron,) = [d for d in docs if d and d.get("kind") == "CronWorkflow"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (template,) = [t for t in cron["spec"]["workflowSpec"]["templates"] if "container" in t]
    argv, args = _realign_args(docs)
    assert argv[argv.index("--run-id") + 1] == PLACEHOLDER  # {{workflow.name}}
    assert template["container"]["args"][template["container"]["args"].index("--run-id") + 1] \
        == "{{workflow.name}}"
    (param,) = template["outputs"]["parameters"]
    assert param["valueFrom"]["path"] == args.summary
    expression = template["retryStrategy"]["expression"]
    assert "75" in expression and "130" in expression and "== 4" not in expression


def test_daskjob_runs_realign_on_its_cluster():
    docs = list(yaml.safe_load_all((WORKFLOWS / "k8s-daskjob-realign.yaml").read_text()))
    (job,) = [d for d in docs if d and d.get("kind") == "DaskJob"]
    assert job["spec"]["job"]["spec"]["restartPolicy"] == "Never"
    argv, args = _realign_args(docs)
    assert args.scheduler and args.run_id
    script = job["spec"]["job"]["spec"]["containers"][0]["args"][0]
    assert "75|130|137|143)" in script and 'exit "$code"' in script


def _migrate(tmp_path, env_extra):
    """Run workflows/migrate.sh with a `bigalign` on PATH that imports this checkout."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "bigalign"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bigalign.cli "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", WORKERS="1",
               PYTHONPATH=f"{root}:{os.environ.get('PYTHONPATH', '')}", **env_extra)
    if "MAX_RELATIVE_RESIDUAL" not in env_extra:
        env.pop("MAX_RELATIVE_RESIDUAL", None)
    return subprocess.run(["bash", str(WORKFLOWS / "migrate.sh"), "a.zarr", "b.zarr",
                           "a.zarr", "out"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_migrate_gates_on_held_out_recall_and_exits_4(tmp_path):
    """migrate.sh fits on the first 90% of the pairs, gates on `bigalign evaluate`'s
    held-out recall@10 (and optionally the held-out residual), exits 4 on a failed gate
    with nothing mapped, and refuses the old training-residual variable (exit 2)."""
    import json

    import numpy as np
    import zarr
    from conftest import planted

    a, b, _ = planted(600, 8, noise=1.0, offset_a=2.0, offset_b=1.0, seed=3)
    for name, x in (("a", a), ("b", b)):
        zarr.create_array(str(tmp_path / f"{name}.zarr"), data=x, chunks=(100, 8))
    # the oracle: held-out recall@10 of the fit on rows 0:540, searched in numpy
    import bigalign
    t = bigalign.fit(zarr.array(a[:540], chunks=(100, 8)), zarr.array(b[:540], chunks=(100, 8)),
                     center=True)
    y, tb = t.transform(a[540:]), b[540:]
    q = y / np.linalg.norm(y, axis=1, keepdims=True)
    d = tb / np.linalg.norm(tb, axis=1, keepdims=True)
    s = q @ d.T
    recall = float(np.mean((s > np.diag(s)[:, None]).sum(axis=1) < 10))
    assert 0.3 < recall < 1.0
    ok = _migrate(tmp_path, {"MIN_RECALL_AT_10": str(recall - 0.01)})
    assert ok.returncode == 0, ok.stderr
    assert f"recall@10 {recall:.4f}" in ok.stderr and "rows [540, 600]" in ok.stderr
    assert json.loads((tmp_path / "out" / "corpus.zarr" / "zarr.json").read_text())
    import shutil
    shutil.rmtree(tmp_path / "out")
    failed = _migrate(tmp_path, {"MIN_RECALL_AT_10": str(min(recall + 0.01, 1.0))})
    assert failed.returncode == 4, failed.stderr
    assert "FAILED" in failed.stderr and not (tmp_path / "out" / "corpus.zarr").exists()
    old = _migrate(tmp_path, {"MAX_RELATIVE_RESIDUAL": "0.5"})
    assert old.returncode == 2 and "MAX_HELDOUT_RELATIVE_RESIDUAL" in old.stderr
