#!/usr/bin/env bash
# Build the two service images from images/Dockerfile:
#   tessera-curator:<version>  and  tessera-participant:<version>   (<version> from pyproject.toml)
#
# Environment (all optional):
#   PYTHON_IMAGE, TORCH_SPEC, TORCH_PIP_ARGS   forwarded as --build-arg when set (values may contain spaces,
#                                              e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>")
#   PYTHON_IMAGE unset: python:3.11-slim-bookworm if the engine has it or no debootstrap base can be made;
#                       else (root, debootstrap, no such image here: a host that cannot pull) the local
#                       tessera-base:bookworm, made by scripts/make-base-image.sh when missing.
#   TORCH_WHEEL     a local torch wheel file to install (copied into the build context, never into the final
#                   image); unset: a torch-<version>+cpu wheel for cp311 in pip's find-links directories if
#                   there is one; "none": never a local wheel (TORCH_SPEC from the index)
#   PIP_CERT        a CA bundle for pip inside the build (e.g. behind a TLS-intercepting proxy); unset: the
#                   host pip's `cert` setting, if any. Used in the builder stage only.
#   DOCKER_BUILD_ARGS                          extra `docker build` arguments, split on whitespace
#                                              (e.g. "--pull --platform linux/amd64"); no shell quoting
#   DOCKER                                     the docker CLI to use (default: docker)
#
# Exit status: 0 built, 2 no docker CLI or no reachable Docker engine, other = the failing build's status.
set -euo pipefail

docker_cli="${DOCKER:-docker}"

# Only shell builtins until the engine is known to answer, so the diagnosis works on a bare PATH too.
missing() {
  printf 'build-images: %s\n' "$1" >&2
  shift
  printf '  %s\n' "$@" >&2
  exit 2
}

if ! command -v "$docker_cli" >/dev/null 2>&1; then
  missing "no docker CLI: '$docker_cli' is not on PATH." \
    "Install Docker (Debian/Ubuntu: apt-get install docker.io), start the engine (dockerd), then run 'make images' again."
fi

if ! info_error="$("$docker_cli" info 2>&1 >/dev/null)"; then
  missing "no Docker engine: '$docker_cli info' failed, so no engine is reachable." \
    "Install docker.io and start dockerd (e.g. 'systemctl start docker'), or point DOCKER_HOST at a running engine," \
    "and check that this user may use the engine's socket (e.g. is in the 'docker' group)." \
    "docker said: ${info_error:-nothing}"
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The version of the [project] table (not e.g. [tool.mypy] python_version).
version="$(awk '
  /^\[/ { in_project = ($0 == "[project]") }
  in_project && /^version[[:space:]]*=/ { gsub(/^version[[:space:]]*=[[:space:]]*"|".*$/, ""); print; exit }
' "$root/pyproject.toml")"
if [ -z "$version" ]; then
  echo "build-images: cannot read [project] version from $root/pyproject.toml" >&2
  exit 1
fi

build_args=(--build-arg "VERSION=$version"
            --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
if revision="$(git -C "$root" rev-parse HEAD 2>/dev/null)"; then
  build_args+=(--build-arg "REVISION=$revision")
fi
for name in TORCH_SPEC TORCH_PIP_ARGS; do
  if [ -n "${!name:-}" ]; then
    build_args+=(--build-arg "$name=${!name}")
  fi
done

# --- the base image ----------------------------------------------------------------------------------------
default_base="python:3.11-slim-bookworm"
local_base="tessera-base:bookworm"
if [ -z "${PYTHON_IMAGE:-}" ] && ! "$docker_cli" image inspect "$default_base" >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null 2>&1; then
  # Root with debootstrap and no Python image here: build on Debian's own python3 rather than rely on a pull.
  if ! "$docker_cli" image inspect "$local_base" >/dev/null 2>&1; then
    DOCKER="$docker_cli" bash "$root/scripts/make-base-image.sh" "$local_base" python3,python3-venv
  fi
  PYTHON_IMAGE="$local_base"
fi
if [ -n "${PYTHON_IMAGE:-}" ]; then
  echo "build-images: base image $PYTHON_IMAGE"
fi

# --- files for the builder stage only (build context directory .build/, git-ignored) -----------------------
staging="$root/.build"
rm -rf "$staging"
mkdir -p "$staging/wheels" "$staging/certs"
: >"$staging/wheels/.keep"
: >"$staging/certs/.keep"

pip_setting() {  # the value of a host pip setting (e.g. find-links, cert), or nothing
  { python3 -m pip config list 2>/dev/null || true; } | sed -n "s/^[a-z:]*\.$1='\(.*\)'$/\1/p" | head -1
}

torch_wheel="${TORCH_WHEEL-}"
if [ -z "${TORCH_WHEEL+set}" ]; then
  torch_version="$(sed -n 's/^torch==\([0-9.]*\)$/\1/p' <<<"${TORCH_SPEC:-torch==2.13.0}")"
  for links in $(pip_setting find-links); do
    for candidate in "$links"/torch-"$torch_version"+cpu-cp311-cp311-*_x86_64.whl; do
      if [ -n "$torch_version" ] && [ -f "$candidate" ]; then torch_wheel="$candidate"; fi
    done
  done
fi
if [ -n "$torch_wheel" ] && [ "$torch_wheel" != none ]; then
  if [ ! -f "$torch_wheel" ]; then
    echo "build-images: TORCH_WHEEL $torch_wheel is not a file" >&2
    exit 1
  fi
  wheel_name="$(basename "$torch_wheel")"
  ln -f "$torch_wheel" "$staging/wheels/$wheel_name" 2>/dev/null || cp "$torch_wheel" "$staging/wheels/$wheel_name"
  echo "build-images: torch from the local wheel $torch_wheel"
  build_args+=(--build-arg "TORCH_SPEC=/build/wheels/$wheel_name")
fi

pip_cert="${PIP_CERT:-$(pip_setting cert)}"
if [ -n "$pip_cert" ] && [ -f "$pip_cert" ]; then
  cp "$pip_cert" "$staging/certs/ca.crt"
  build_args+=(--build-arg "BUILD_CA=/build/certs/ca.crt")
fi

# BuildKit needs the buildx plugin with a current CLI; without it, the classic builder builds this file too.
if ! "$docker_cli" buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi

if [ -n "${PYTHON_IMAGE:-}" ]; then
  build_args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
fi

extra=()
read -r -a extra <<<"${DOCKER_BUILD_ARGS:-}"

for target in curator participant; do
  tag="tessera-$target:$version"
  echo "build-images: building $tag (target $target)"
  "$docker_cli" build \
    --file "$root/images/Dockerfile" \
    --target "$target" \
    --tag "$tag" \
    "${build_args[@]}" \
    ${extra[@]+"${extra[@]}"} \
    "$root"
done

echo "build-images: built tessera-curator:$version and tessera-participant:$version"
