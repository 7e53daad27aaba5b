"""Static checks of images/Dockerfile, /.dockerignore and scripts/build-images.sh.

No Docker engine is needed (none may be available): the Dockerfile is parsed line by line, and the build
script runs against a PATH without docker and against a stub docker CLI that records its arguments.
hadolint is deliberately not required.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"
TARGETS = ("curator", "participant")
UID = "10001"
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|make|cmake|python3?-dev|libc6-dev)\b")


# -- a minimal Dockerfile reader ---------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, name: str) -> list[Stage]:
        """The stage and its ancestors (FROM <stage>), root first."""
        chain: list[Stage] = []
        stage: Stage | None = self.stages[name]
        while stage is not None:
            chain.insert(0, stage)
            stage = self.stages.get(stage.base)
        return chain

    def effective(self, name: str, keyword: str) -> str | None:
        """The last value of an instruction that a stage inherits or sets (USER, ENTRYPOINT, CMD...)."""
        values = [v for stage in self.chain(name) for v in stage.all(keyword)]
        return values[-1] if values else None

    def env(self, name: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for stage in self.chain(name):
            for args in stage.all("ENV"):
                env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
        return env


def logical_lines(text: str) -> list[str]:
    """Dockerfile lines with comments dropped and backslash continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            if pending and not stripped:
                lines.append(pending)
                pending = ""
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
        else:
            lines.append(pending + stripped)
            pending = ""
    if pending:
        lines.append(pending)
    return lines


def parse(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = Stage(name=match[2], base=match[1])
            assert current.name not in stages, f"stage {current.name} defined twice"
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            current.instructions.append((keyword, args))
    return Dockerfile(global_args=global_args, stages=stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE.read_text())


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


# -- the Dockerfile ------------------------------------------------------------------------------------


def test_both_targets_exist_and_share_a_base_stage(dockerfile: Dockerfile) -> None:
    for target in TARGETS:
        assert target in dockerfile.stages
    roots = {dockerfile.chain(name)[0].name for name in (*TARGETS, "builder")}
    assert len(roots) == 1, f"curator, participant and builder must share one base stage, got {roots}"


def test_base_image_is_a_build_arg(dockerfile: Dockerfile) -> None:
    assert dockerfile.global_args.get("PYTHON_IMAGE") == "python:3.11-slim-bookworm"
    external = {s.base for s in dockerfile.stages.values() if s.base not in dockerfile.stages}
    assert external == {"${PYTHON_IMAGE}"}, "the only external image must be the PYTHON_IMAGE build argument"


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_runs_as_numeric_non_root_user(dockerfile: Dockerfile, target: str) -> None:
    user = dockerfile.effective(target, "USER")
    assert user is not None
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and uid == UID, f"USER must be numeric {UID} (runAsNonRoot checks it), got {user}"
    assert not gid or gid == UID


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_has_no_compilers_and_only_the_venv_from_the_builder(
    dockerfile: Dockerfile, target: str
) -> None:
    chain = dockerfile.chain(target)
    assert "builder" not in [s.name for s in chain]
    for stage in chain:
        for run in stage.all("RUN"):
            assert not COMPILERS.search(run), f"{stage.name}: a compiler is installed: {run}"
        for copy in stage.all("COPY"):
            if "--from=" in copy:
                assert copy == "--from=builder /opt/venv /opt/venv", copy
            else:
                pytest.fail(f"{stage.name} copies from the build context: {copy}")


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_the_console_script_and_cmd_the_service(dockerfile: Dockerfile, target: str) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = dockerfile.effective(target, "ENTRYPOINT")
    cmd = dockerfile.effective(target, "CMD")
    assert entrypoint is not None and cmd is not None
    # Exec form (JSON), so the service is PID 1 and receives SIGTERM.
    assert json.loads(entrypoint) == ["tessera"]
    assert "tessera" in scripts
    assert json.loads(cmd) == [target]


@pytest.mark.parametrize("target", TARGETS)
def test_runtime_environment_and_writable_paths(dockerfile: Dockerfile, target: str) -> None:
    env = dockerfile.env(target)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert dockerfile.effective(target, "WORKDIR") == "/var/lib/tessera"
    volumes = [v for s in dockerfile.chain(target) for args in s.all("VOLUME") for v in json.loads(args)]
    assert volumes == ["/var/lib/tessera"]
    # Caches that libraries write at import time go to /tmp (an emptyDir), not to the read-only root.
    assert env["MPLCONFIGDIR"].startswith("/tmp/")
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")


@pytest.mark.parametrize("target", TARGETS)
def test_oci_labels(dockerfile: Dockerfile, target: str) -> None:
    labels = " ".join(args for s in dockerfile.chain(target) for args in s.all("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert f'org.opencontainers.image.title="tessera-{target}"' in labels


def test_builder_installs_torch_before_the_project(dockerfile: Dockerfile) -> None:
    builder = dockerfile.stages["builder"]
    args = dict(a.partition("=")[::2] for a in builder.all("ARG"))
    assert args["TORCH_SPEC"] == "torch==2.13.0"
    assert args["TORCH_PIP_ARGS"] == ""
    runs = " ".join(builder.all("RUN"))
    torch_at = runs.index('pip install ${TORCH_PIP_ARGS} "${TORCH_SPEC}"')
    project_at = runs.index("pip install /src")
    assert torch_at < project_at
    assert "python3 -m venv /opt/venv" in runs  # python3: a Debian-made base has no `python`
    # The local wheel (if any) comes from the staged .build/ directory, into the builder only.
    assert ".build/ /build/" in builder.all("COPY")


def test_makefile_and_dockerfile_agree_on_torch() -> None:
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, flags=re.MULTILINE)
    if match is None:
        pytest.skip("the Makefile no longer pins TORCH_SPEC")
    assert match[1] in DOCKERFILE.read_text()


def test_dockerfile_names_no_registry_or_url() -> None:
    # The CPU wheel index and any mirror are supplied at build time (TORCH_PIP_ARGS, PYTHON_IMAGE).
    assert "://" not in DOCKERFILE.read_text()


# -- the build context ---------------------------------------------------------------------------------


def test_dockerignore_keeps_sources_and_drops_local_state() -> None:
    patterns = {
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"
    }
    for excluded in (".venv", ".git", ".tools", "charts", "tests", "**/__pycache__", ".mypy_cache"):
        assert excluded in patterns, excluded
    for needed in ("pyproject.toml", "README.md", "shared", "services"):
        assert needed not in patterns and not any(p.startswith(f"{needed}/") for p in patterns), needed
    assert not any(p.startswith("!") for p in patterns)


# -- scripts/build-images.sh ---------------------------------------------------------------------------


TOOLS = ("bash", "awk", "date", "dirname", "git", "sed", "rm", "mkdir", "ln", "cp", "basename", "head", "id")


def bare_path(tmp_path: Path, tools: tuple[str, ...] = TOOLS) -> str:
    """A PATH of symlinks to a few ordinary tools, and certainly no docker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    assert not (bin_dir / "docker").exists()
    return str(bin_dir)


def script_copy(tmp_path: Path) -> Path:
    """The script in a skeleton repository: it stages files in <root>/.build, which must not be this
    checkout's (a real `make images` may be using it at the same time)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(BUILD_SCRIPT, root / "scripts" / BUILD_SCRIPT.name)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def run_script(path: str, **env: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash
    environ = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env}
    root = script_copy(Path(path).parent)
    return subprocess.run(
        [bash, str(root / "scripts" / BUILD_SCRIPT.name)],
        env=environ, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def fake_docker(bin_dir: Path, *, info_ok: bool, log: Path) -> None:
    script = bin_dir / "docker"
    info = "exit 0" if info_ok else 'echo "Cannot connect to the Docker daemon" >&2; exit 1'
    script.write_text(
        f"#!{shutil.which('bash')}\n"
        f'if [ "$1" = info ]; then {info}; fi\n'
        # `image inspect`: every image exists (so no base image is made); `buildx version`: BuildKit is there.
        'if [ "$1" = image ] || [ "$1" = buildx ]; then exit 0; fi\n'
        f'for a in "$@"; do printf \'%s\\n\' "$a"; done >> {log}\n'
        f"echo ---- >> {log}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_build_script_without_docker_exits_2_and_says_what_is_missing(tmp_path: Path) -> None:
    result = run_script(bare_path(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "no docker CLI" in result.stderr
    assert "install" in result.stderr.lower() and "docker.io" in result.stderr
    assert result.stdout == ""


def test_build_script_without_engine_exits_2_and_says_what_is_missing(tmp_path: Path) -> None:
    path = bare_path(tmp_path)
    log = tmp_path / "docker.log"
    fake_docker(Path(path), info_ok=False, log=log)
    result = run_script(path)
    assert result.returncode == 2, result.stderr
    assert "no Docker engine" in result.stderr
    assert "start dockerd" in result.stderr
    assert "Cannot connect to the Docker daemon" in result.stderr  # docker's own words are passed on
    assert not log.exists(), "nothing may be built without an engine"


def test_build_script_builds_both_targets_with_version_tags_and_passthrough(tmp_path: Path) -> None:
    path = bare_path(tmp_path)
    log = tmp_path / "docker.log"
    fake_docker(Path(path), info_ok=True, log=log)
    result = run_script(
        path,
        DOCKER_BUILD_ARGS="--pull --platform linux/amd64",
        TORCH_PIP_ARGS="--index-url http://wheels.invalid/cpu",
        TORCH_WHEEL="none",
    )
    assert result.returncode == 0, result.stderr
    version = project_version()
    builds = [block.split("\n") for block in log.read_text().split("----\n") if block.strip()]
    assert len(builds) == 2
    for target, args in zip(TARGETS, builds, strict=True):
        args = [a for a in args if a]
        assert args[0] == "build"
        assert args[args.index("--target") + 1] == target
        assert args[args.index("--tag") + 1] == f"tessera-{target}:{version}"
        root = tmp_path / "repo"
        assert args[args.index("--file") + 1] == str(root / "images" / "Dockerfile")
        assert f"VERSION={version}" in args
        assert "TORCH_PIP_ARGS=--index-url http://wheels.invalid/cpu" in args  # one argument, spaces kept
        assert {"--pull", "--platform", "linux/amd64"} <= set(args)
        assert args[-1] == str(root)
    assert f"tessera-curator:{version}" in result.stdout


def test_build_script_does_not_need_hadolint() -> None:
    assert "hadolint" not in BUILD_SCRIPT.read_text()
    assert "hadolint" not in (ROOT / "Makefile").read_text()
