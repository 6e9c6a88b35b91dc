"""docker/compose.yaml, linted without a Docker engine: it parses (PyYAML, a dependency of
Dask), its structure holds (images or builds, dependencies that exist and run in order,
volumes declared), and every command it runs is accepted by the real command line:
``bigalign ...`` by :func:`bigalign.cli.build_parser`, ``dask scheduler`` / ``dask worker``
by distributed's own (click) parsers."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

COMPOSE = Path(__file__).resolve().parents[1] / "docker" / "compose.yaml"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def _bigalign_services(compose):
    return {name: s for name, s in compose["services"].items()
            if s.get("image") == "bigalign:local" and "entrypoint" not in s}


def test_structure(compose):
    services = compose["services"]
    assert {"s3", "scheduler", "worker-1", "worker-2", "demo", "job-fit",
            "job-apply"} <= set(services)
    declared = set(compose.get("volumes") or {})
    for name, s in services.items():
        assert s.get("image") or s.get("build"), name
        deps = s.get("depends_on") or {}
        for dep in deps:
            assert dep in services and dep != name, (name, dep)
        if isinstance(deps, dict):
            for dep, cond in deps.items():
                assert cond["condition"] in ("service_started", "service_healthy",
                                             "service_completed_successfully")
                if cond["condition"] == "service_healthy":
                    assert "healthcheck" in services[dep], dep
        for vol in s.get("volumes") or []:
            source = vol.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in declared, (name, vol)
        assert isinstance(s.get("command", []), (list, str)), name
    # the bigalign services share the image built from this repository's Dockerfile
    build = services["scheduler"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve().exists()
    # the job runs in order, and against the cluster and the object store
    chain = ["demo", "upload", "job-fit", "job-apply", "job-info"]
    for first, then in zip(chain, chain[1:]):
        assert services[then]["depends_on"][first]["condition"] == \
            "service_completed_successfully"
    env = services["job-fit"]["environment"]
    assert env["DASK_SCHEDULER_ADDRESS"] == "tcp://scheduler:8786"
    assert "s3" in services["worker-1"]["depends_on"]


def test_bigalign_commands_parse(compose):
    from bigalign.cli import build_parser
    services = _bigalign_services(compose)
    assert {"demo", "job-fit", "job-apply", "job-info"} <= set(services)
    for name, s in services.items():
        argv = [str(a) for a in s["command"]]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # argparse's way of refusing
            raise AssertionError(f"{name}: bigalign {' '.join(argv)} is refused ({e})")
        assert args.command == argv[0]
        if args.command in ("fit", "apply"):
            assert args.storage_option == ["endpoint_url=http://s3:9000"]
            assert all(str(p).startswith("s3://") for p in
                       [args.output, getattr(args, "source", None)] if p)


@pytest.mark.parametrize("service,module", [("scheduler", "dask_scheduler"),
                                            ("worker-1", "dask_worker"),
                                            ("worker-2", "dask_worker")])
def test_dask_commands_parse(compose, service, module):
    import importlib
    s = compose["services"][service]
    assert s["entrypoint"] == ["dask"]
    sub, *argv = [str(a) for a in s["command"]]
    assert sub == module.split("_")[1]
    cli = importlib.import_module(f"distributed.cli.{module}").main
    ctx = cli.make_context(f"dask {sub}", list(argv))  # raises on unknown options
    if sub == "worker":
        assert ctx.params["scheduler"] == "tcp://scheduler:8786"
        assert ctx.params["nthreads"] == 2
    else:
        assert ctx.params["scheduler_file"] == "/home/bigalign/scheduler.json"
