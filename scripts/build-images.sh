#!/usr/bin/env bash
# Build the two service images from images/Dockerfile:
#   tessera-curator:<version>  and  tessera-participant:<version>   (<version> from pyproject.toml)
#
# Environment (all optional):
#   PYTHON_IMAGE, TORCH_SPEC, TORCH_PIP_ARGS   forwarded as --build-arg when set (values may contain spaces,
#                                              e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>")
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
for name in PYTHON_IMAGE TORCH_SPEC TORCH_PIP_ARGS; do
  if [ -n "${!name:-}" ]; then
    build_args+=(--build-arg "$name=${!name}")
  fi
done

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
