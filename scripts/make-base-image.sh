#!/usr/bin/env bash
# Make a Debian bookworm base image with Python 3.11 from Debian's own packages, for hosts that cannot pull
# images (no registry reachable, but Debian's package mirror is, as apt-get uses it):
#
#   debootstrap --variant=minbase --include=<packages> bookworm <dir>  ->  docker import  ->  IMAGE
#
# Usage: scripts/make-base-image.sh IMAGE [PACKAGES]
#   IMAGE     the tag to create (e.g. tessera-base:bookworm)
#   PACKAGES  comma-separated extra packages (default: python3,python3-venv; the broker image of
#             e2e/containers adds rabbitmq-server)
# Environment: DOCKER (the CLI, default docker), DEBOOTSTRAP_MIRROR (default: debootstrap's own default).
# Needs root (debootstrap) and a running engine. Takes about 1.5 min; the image is about 100 MB.
set -euo pipefail

image="${1:?usage: make-base-image.sh IMAGE [PACKAGES]}"
packages="${2:-python3,python3-venv}"
docker_cli="${DOCKER:-docker}"

if [ "$(id -u)" != 0 ]; then
  echo "make-base-image: debootstrap needs root" >&2
  exit 2
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "make-base-image: no debootstrap (apt-get install debootstrap)" >&2
  exit 2
fi

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/tessera-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT

echo "make-base-image: debootstrap bookworm with $packages (about 1.5 min)"
# shellcheck disable=SC2086  # the mirror is optional: no argument means debootstrap's default
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" ${DEBOOTSTRAP_MIRROR:-} >"$rootfs.log" 2>&1 || {
  tail -20 "$rootfs.log" >&2
  rm -f "$rootfs.log"
  echo "make-base-image: debootstrap failed" >&2
  exit 1
}
rm -f "$rootfs.log"
# No package lists or downloaded packages in the image: they are only needed to install more.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/tmp/*
# Log files, not the directories: packages own them (rabbitmq-server cannot start without /var/log/rabbitmq).
find "$rootfs"/var/log -type f -delete

tar -C "$rootfs" -c . | "$docker_cli" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$image" >/dev/null
echo "make-base-image: created $image"
