"""infra/: manifests parse and agree with the code (images, job flags, schedules, pins); the
local stack script really starts MLflow + S3 on loopback and stops them by pid."""

import dataclasses
import re
import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _pin(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", dep)
        if match:
            return match.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_yaml() -> list[Path]:
    return sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _k8s_docs() -> list[dict]:
    return [d for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in _docs(p)]


def _by_kind(kind: str) -> list[dict]:
    return [d for d in _k8s_docs() if d["kind"] == kind]


def test_every_yaml_file_parses():
    files = _all_yaml()
    assert len(files) >= 6
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} holds no document"


def test_k8s_documents_are_complete_and_in_one_namespace():
    kinds = sorted(d["kind"] for d in _k8s_docs())
    assert kinds == sorted(
        [
            "CronJob",
            "Deployment",
            "Namespace",
            "RayCluster",
            "RayJob",
            "Secret",
            "Secret",
            "Service",
        ]
    )
    for doc in _k8s_docs():
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "attention", doc["metadata"]


def test_images_are_the_project_version_and_ray_matches_the_pin():
    images = {n["image"] for d in _k8s_docs() for n in _walk(d) if "image" in n}
    assert images == {f"attention-pipeline:{VERSION}", f"attention-pipeline:{VERSION}-cu128"}
    (cluster,) = _by_kind("RayCluster")
    assert cluster["spec"]["rayVersion"] == _pin("ray")
    (job,) = _by_kind("RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]


def _job_argv(command: list[str]) -> tuple[str, list[str]]:
    """(script, its arguments) from a command line that runs ``python jobs/x.py ...``."""
    i = (
        command.index("python")
        if "python" in command
        else [c.endswith("/python") for c in command].index(True)
    )
    return command[i + 1], command[i + 2 :]


def _check_config(path: Path, overrides: list[str]) -> None:
    """The file and every ``--set`` of a manifest are a valid training config."""
    from pipeline.train.config import load_config

    load_config(ROOT / path, overrides)


def test_cronjob_submits_retrain_with_flags_the_job_accepts():
    from jobs import retrain

    (cron,) = _by_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    script, argv = _job_argv(container["command"])
    assert script == "jobs/retrain.py"
    args = retrain.parse_args(argv)
    assert (args.register, args.alias, args.metric) == ("fmow-ats", "champion", "accuracy")
    assert (ROOT / args.config).is_file(), f"CronJob names a missing config {args.config}"
    _check_config(args.config, args.overrides)
    (cluster,) = _by_kind("RayCluster")
    assert f"{cluster['metadata']['name']}-head-svc" in " ".join(container["command"])


def test_rayjob_entrypoint_parses_with_the_training_job():
    from jobs import train_fmow

    (job,) = _by_kind("RayJob")
    script, argv = _job_argv(shlex.split(job["spec"]["entrypoint"]))
    assert script == "jobs/train_fmow.py"
    args = train_fmow.parse_args(argv)
    assert args.register == "fmow-ats" and (ROOT / args.config).is_file()
    _check_config(args.config, args.overrides)


def test_cron_line_schedule_and_command():
    lines = [
        line
        for line in (INFRA / "cron/retrain.cron").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    minute, hour, dom, month, dow, command = fields
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24 and (dom, month, dow) == ("*", "*", "*")
    (cron,) = _by_kind("CronJob")
    assert cron["spec"]["schedule"] == " ".join(fields[:5])  # one schedule, two deployments
    assert "flock -n" in command
    from jobs import retrain

    script, argv = _job_argv(shlex.split(command.split(">>")[0].split("&&")[-1]))
    assert script == "jobs/retrain.py"
    args = retrain.parse_args(argv)
    assert args.register == "fmow-demo"
    _check_config(args.config, args.overrides)


def test_infra_configs_are_valid_training_configs():
    from pipeline.train.config import load_config

    configs = sorted((INFRA / "configs").glob("*.yaml"))
    assert [p.name for p in configs] == ["fmow_ats_k8s.yaml", "fmow_ats_local.yaml"]
    k8s, local = (load_config(p) for p in configs)
    assert k8s.data.manifest.startswith("s3://") and k8s.run.storage_path.startswith("s3://")
    assert not local.data.manifest.startswith("s3://")
    # the scheduled retraining trains the demo's recipe, which learns on the demo data
    demo = load_config(ROOT / "jobs" / "configs" / "fmow_demo.yaml")
    assert dataclasses.replace(local, run=demo.run) == demo


def test_dockerfile_pins_come_from_pyproject():
    text = (INFRA / "Dockerfile").read_text()
    python = re.search(r"^FROM python:(\d+\.\d+)", text, re.M).group(1)
    assert f">={python}" in PYPROJECT["project"]["requires-python"]
    assert f"ARG TORCH_VERSION={_pin('torch')}" in text
    assert "pip install ." in text  # every other pin is installed from pyproject.toml itself
    assert "torchvision" not in text


def test_compose_publishes_on_loopback_only_and_mlflow_uses_one_worker():
    compose = _docs(INFRA / "local/docker-compose.yaml")[0]
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    command = compose["services"]["mlflow"]["command"]
    assert "--workers=1" in command
    assert any(c.startswith("--artifacts-destination=s3://") for c in command)

