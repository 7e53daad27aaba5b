"""The built images, run by a real engine: user, read-only root, commands, no build tools, chart paths.

Runs against the images `make images` built (tessera-curator:<version>, tessera-participant:<version>)
with the docker CLI (or $DOCKER). Skips, saying why, without a CLI, without a reachable engine, or when
the images are not built; TESSERA_IMAGE_TESTS=require turns those skips into failures (for CI that built
the images first).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TARGETS = ("curator", "participant")
DOCKER = os.environ.get("DOCKER", "docker")


def _unavailable(reason: str) -> None:
    if os.environ.get("TESSERA_IMAGE_TESTS") == "require":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine() -> str:
    cli = shutil.which(DOCKER)
    if cli is None:
        _unavailable(f"no {DOCKER} CLI: install docker.io and start dockerd, then `make images`")
    assert cli is not None
    info = subprocess.run([cli, "info"], capture_output=True, text=True, timeout=30, check=False)
    if info.returncode != 0:
        _unavailable(f"no container engine answers `{DOCKER} info` ({info.stderr.strip()[:200]})")
    for target in TARGETS:
        found = subprocess.run(
            [cli, "image", "inspect", f"tessera-{target}:{VERSION}"], capture_output=True, timeout=30
        )
        if found.returncode != 0:
            _unavailable(f"image tessera-{target}:{VERSION} is not built: run `make images`")
    return cli


def run(
    engine: str, target: str, *args: str, entrypoint: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The image as the charts run it: read-only root, /tmp a tmpfs, no capabilities."""
    command = [engine, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--network", "none"]  # fmt: skip
    if entrypoint is not None:
        command += ["--entrypoint", entrypoint]
    command += [f"tessera-{target}:{VERSION}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def inspect(engine: str, target: str) -> dict[str, Any]:
    out = subprocess.run(
        [engine, "image", "inspect", f"tessera-{target}:{VERSION}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    (document,) = json.loads(out.stdout)
    return dict(document)


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_10001_with_a_read_only_root(engine: str, target: str) -> None:
    result = run(engine, target, "-c", "id -u; id -g; touch /opt/x 2>&1 || echo read-only", entrypoint="sh")
    assert result.returncode == 0, result.stderr
    uid, gid, *rest = result.stdout.split("\n")
    assert (uid, gid) == ("10001", "10001")
    assert "read-only" in "\n".join(rest)


@pytest.mark.parametrize("target", TARGETS)
def test_the_cli_works_read_only(engine: str, target: str) -> None:
    helped = run(engine, target, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "model" in helped.stdout and "settings" in helped.stdout
    listed = run(engine, target, "settings", "curator")
    assert listed.returncode == 0, listed.stderr
    assert "TESSERA_STATE_DIR" in listed.stdout and "TESSERA_ROUNDS__KEEP_WEIGHTS" in listed.stdout
    # The service starts its settings loader and refuses a missing configuration with status 2 (not a crash
    # on a read-only filesystem, which would be 1 with a traceback).
    started = run(engine, target)
    assert started.returncode == 2, started.stderr
    assert "Traceback" not in started.stderr
    # torch, opacus and the model export import (and compile nothing onto the read-only root).
    imported = run(
        engine, target, "-c",
        "import torch, opacus, safetensors, tessera.apps.export; print(torch.version.cuda)",
        entrypoint="python",
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "None", "the image holds a CUDA build of torch"


@pytest.mark.parametrize("target", TARGETS)
def test_no_compiler_and_no_pip_cache(engine: str, target: str) -> None:
    script = (
        "for c in gcc cc g++ clang make cmake; do command -v $c && echo has:$c; done; "
        "for d in /root/.cache/pip /var/lib/tessera/.cache /tmp/.cache /build /src; do "
        "[ -e $d ] && echo has:$d; done; ls /usr/include/python3* 2>/dev/null && echo has:headers; true"
    )
    result = run(engine, target, "-c", script, entrypoint="sh")
    assert result.returncode == 0, result.stderr
    assert "has:" not in result.stdout, result.stdout


def rendered_deployment(target: str) -> dict[str, Any]:
    """The chart's Deployment, rendered with its ci/default-values.yaml."""
    helm = ROOT / ".tools" / "bin" / "helm"
    helm_path = str(helm) if helm.is_file() else shutil.which("helm")
    if helm_path is None:
        pytest.skip("helm is not installed (bash scripts/install-helm.sh): cannot render the charts")
    chart = ROOT / "charts" / f"tessera-{target}"
    env = {**os.environ, "KUBECONFIG": os.devnull}
    out = subprocess.run(
        [helm_path, "template", "t", str(chart), "-f", str(chart / "ci" / "default-values.yaml")],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    if out.returncode != 0:
        pytest.fail(f"helm template tessera-{target}: {out.stderr}")
    (deployment,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"]
    return dict(deployment)


@pytest.mark.parametrize("target", TARGETS)
def test_image_environment_matches_the_charts(engine: str, target: str) -> None:
    config = inspect(engine, target)["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tessera"] and config["Cmd"] == [target]
    assert config["WorkingDir"] == "/var/lib/tessera"
    assert set(config["Volumes"] or {}) == {"/var/lib/tessera"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HOME"] == "/var/lib/tessera"
    assert env["MPLCONFIGDIR"].startswith("/tmp/") and env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert config["Labels"]["org.opencontainers.image.version"] == VERSION

    # What the chart assumes of the image, from its rendered Deployment.
    pod = rendered_deployment(target)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"tessera-{target}:{VERSION}"
    assert [*container["command"], *container["args"]] == [*config["Entrypoint"], *config["Cmd"]]
    uid, gid = config["User"].split(":")
    security = pod["securityContext"]
    assert (str(security["runAsUser"]), str(security["runAsGroup"]), str(security["fsGroup"])) == (
        uid,
        gid,
        gid,
    )
    assert security["runAsNonRoot"] is True  # the image's numeric USER is what lets the kubelet verify it
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The read-only root needs /tmp writable (the image's caches point there) and the state on a volume.
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "/var/lib/tessera" in mounts
    rendered = {e["name"]: e.get("value") for e in container["env"]}
    assert rendered["TESSERA_STATE_DIR"].startswith("/var/lib/tessera/")
    # The probes and the metrics port are the port the service listens on.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert str(ports["metrics"]) == rendered["TESSERA_HEALTH__PORT"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("metrics", ports["metrics"]), probe
