"""Helpers shared by the chart tests (no fixtures here).

Rendered manifests are plain dicts (``yaml.safe_load`` of ``helm template``). The settings helpers load
a rendered container environment into the services' own settings classes, so the tests catch a chart and
a service that disagree about a ``TESSERA_*`` variable.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
import yaml
from kubernetes_validate import utils as kv
from pydantic import BaseModel

if TYPE_CHECKING:
    from conftest import Helm

REPO_ROOT = Path(__file__).resolve().parents[2]
CHARTS_DIR = REPO_ROOT / "charts"
# The oldest Kubernetes the charts support (Chart.yaml kubeVersion) and the newest the validator knows.
K8S_VERSIONS = ["1.29.0", kv.latest_version()]
# Custom resources the validator has no schema for (the Prometheus operator's).
CRD_GROUPS = ("monitoring.coreos.com/",)


def ci_files(chart: str) -> list[Path]:
    return sorted((CHARTS_DIR / chart / "ci").glob("*-values.yaml"))


def values_of(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (
        f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def validate_strict(docs: list[dict[str, Any]], k8s_version: str) -> None:
    """kubernetes-validate in strict mode (unknown fields fail); CRD kinds are checked for shape only."""
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            assert doc["metadata"]["name"] and doc["spec"], doc
            continue
        try:
            kv.validate(doc, k8s_version, strict=True)
        except kv.ValidationError as exc:  # pragma: no cover - the message is the point
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {k8s_version}: {exc}"
            )


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def main_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(docs)["containers"]
    return container


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment; the charts render literal values only (no valueFrom)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        assert "valueFrom" not in item, f"{item['name']}: the charts render literal values only"
        assert item["name"] not in env, f"{item['name']} rendered twice"
        env[item["name"]] = item["value"]
    return env


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def volume_for_path(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume that holds ``path`` in ``container`` and the path relative to its mount."""
    best = max(
        (m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")),
        key=lambda m: len(m["mountPath"]),
        default=None,
    )
    assert best is not None, f"{path} is on no volume of container {container['name']}"
    (volume,) = [v for v in pod["volumes"] if v["name"] == best["name"]]
    return volume, path[len(best["mountPath"].rstrip("/")) + 1 :]


# --------------------------------------------------------------------------------------------- settings
SERVICES = {"tessera-curator": "curator", "tessera-participant": "participant"}


def settings_class(service: str) -> type[BaseModel]:
    if service == "curator":
        from tessera.curator.settings import CuratorSettings

        return CuratorSettings
    from tessera.participant.settings import ParticipantSettings

    return ParticipantSettings


def load_settings(service: str, env: dict[str, str]) -> BaseModel:
    """Load the service's settings exactly as `tessera <service>` does, from ``env`` alone.

    Raises tessera.errors.ConfigurationError naming each unknown, missing or invalid variable.
    """
    if service == "curator":
        from tessera.curator.settings import load_curator_settings as load
    else:
        from tessera.participant.settings import load_participant_settings as load  # type: ignore[assignment]
    with mock.patch.dict(os.environ, env, clear=True):
        return load()


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    return [
        a
        for a in getattr(annotation, "__args__", (annotation,))
        if isinstance(a, type) and issubclass(a, BaseModel)
    ]


def setting_fields(model: type[BaseModel], prefix: str = "TESSERA_", required: bool = True) -> dict[str, Any]:
    """Every leaf variable of ``model`` -> (field, required), where required means the service cannot
    start without it (the field and every model above it are required)."""
    leaves: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        variable = f"{prefix}{name.upper()}"
        nested = _models_of(field.annotation)
        if nested:
            leaves.update(setting_fields(nested[0], variable + "__", required and field.is_required()))
        else:
            leaves[variable] = (field, required and field.is_required())
    return leaves


def setting_value(settings: BaseModel, variable: str, prefix: str = "TESSERA_") -> Any:
    value: Any = settings
    for part in variable.removeprefix(prefix).lower().split("__"):
        value = getattr(value, part)
    return value


# ------------------------------------------------------------------------------------------------ notes
def render_notes(helm: Helm, chart: str, *args: str) -> str:
    """NOTES.txt rendered with the given values (`helm template` does not print NOTES, so a copy of the
    chart renders it through `tpl` as an ordinary template)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / chart
        shutil.copytree(CHARTS_DIR / chart, copy)
        (copy / "templates" / "NOTES.txt").rename(copy / "NOTES.src")
        (copy / "templates" / "notes-as-yaml.yaml").write_text(
            '{{ dict "notes" (tpl (.Files.Get "NOTES.src") .) | toYaml }}\n'
        )
        out = helm.run(
            "template", "tessera", str(copy), "--namespace", "tessera", "--show-only",
            "templates/notes-as-yaml.yaml", *args,
        )  # fmt: skip
    notes: str = yaml.safe_load(out)["notes"]
    return notes


# ---------------------------------------------------------------------------------------------- values
def leaf_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            paths += leaf_paths(value, f"{prefix}{key}.")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def assert_every_value_documented(chart: str) -> None:
    text = (CHARTS_DIR / chart / "values.yaml").read_text()
    params = set(re.findall(r"^\s*## @param (\S+)", text, re.MULTILINE))
    for path in leaf_paths(yaml.safe_load(text)):
        parts = path.split(".")
        documented = any(".".join(parts[:i]) in params for i in range(1, len(parts) + 1))
        assert documented, f"{chart}/values.yaml: {path} has no @param comment"
    readme = (CHARTS_DIR / chart / "README.md").read_text()
    missing = sorted(p for p in params if f"| `{p}` |" not in readme)
    assert not missing, f"{chart}/README.md parameter table lacks {missing}"
    schema = yaml.safe_load((CHARTS_DIR / chart / "values.schema.json").read_text())
    for path in params:
        node = schema
        for part in path.split("."):
            assert node.get("additionalProperties") is False or node is schema, (
                f"{path}: schema allows extras"
            )
            is_list = part.endswith("[]")  # `organisations[].id`: a field of every item of a list
            node = node["properties"].get(part.removesuffix("[]"))
            assert node is not None, f"{chart}/values.schema.json has no property for {path}"
            if is_list:
                node = node.get("items")
                assert isinstance(node, dict), f"{chart}/values.schema.json: {path} is not a list of items"
            if node.get("type") != "object" or "properties" not in node:
                break
