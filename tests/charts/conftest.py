"""Fixtures for the Helm chart tests: find helm, render a chart, run helm and capture its failure.

helm is looked up at `.tools/bin/helm` (installed by `scripts/install-helm.sh`), then on PATH. Without it
the chart tests skip and say how to install it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHARTS_DIR = REPO_ROOT / "charts"
HELM_TIMEOUT_S = 60


def find_helm() -> str | None:
    """The pinned helm in `.tools/bin` if present, else whatever `helm` is on PATH, else None."""
    local = REPO_ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


def run_helm(helm_path: str, *args: str) -> str:
    """Run helm without any cluster or user configuration; return stdout or raise HelmError."""
    env = {
        **os.environ,
        # Never talk to a real cluster or read the developer's helm repositories.
        "KUBECONFIG": os.devnull,
        "HELM_CACHE_HOME": str(REPO_ROOT / ".tools" / "helm-cache"),
        "HELM_CONFIG_HOME": str(REPO_ROOT / ".tools" / "helm-config"),
        "HELM_DATA_HOME": str(REPO_ROOT / ".tools" / "helm-data"),
    }
    proc = subprocess.run(
        [helm_path, *args], capture_output=True, text=True, env=env, timeout=HELM_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


@functools.cache
def _render_cached(helm_path: str, chart: str, args: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    out = run_helm(helm_path, "template", "tessera", str(CHARTS_DIR / chart), "--namespace", "tessera", *args)
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


class Helm:
    """A helm binary for the tests: `run` any command, `render` a chart of this repository."""

    Error = HelmError

    def __init__(self, path: str) -> None:
        self.path = path

    def run(self, *args: str) -> str:
        """Run helm and return its stdout; raise Helm.Error with helm's message when it fails."""
        return run_helm(self.path, *args)

    def render(self, chart: str, *args: str) -> list[dict[str, Any]]:
        """`helm template` charts/<chart> with extra arguments (-f, --set ...); the parsed manifests.

        Cached per argument list, so many assertions on one rendering cost one helm run.
        """
        return list(_render_cached(self.path, chart, tuple(args)))


@pytest.fixture(scope="session")
def helm() -> Helm:
    path = find_helm()
    if path is None:
        pytest.skip(
            "helm is not installed: run `bash scripts/install-helm.sh` (installs it into .tools/bin/helm) "
            "or put helm on PATH"
        )
    return Helm(path)
