#!/usr/bin/env bash
# The Kubernetes end-to-end run on kind (hosts with Docker and kind): creates a kind cluster, builds the
# curator and participant images and loads them, installs tessera-broker and tessera-curator in namespace
# "tessera" and one tessera-participant release in each of the namespaces acme, globex and initech,
# deletes one participant pod in the middle of a round, and checks that the federation still completes
# and reaches its target accuracy. All of that is e2e/kind/test_kind_rollout.py; this script checks the
# prerequisites and runs it.
#
#   e2e/kind/run.sh                      # everything, then delete the cluster
#   TESSERA_KIND_KEEP=1 e2e/kind/run.sh  # keep the cluster afterwards (kind delete cluster --name tessera-e2e)
#   TESSERA_KIND_CLUSTER=mine e2e/kind/run.sh   # use (and keep) an existing kind cluster
#   TESSERA_KIND_SKIP_BUILD=1 e2e/kind/run.sh   # images tessera-{curator,participant}:<version> already built
#
# Extra arguments go to pytest. Exits 2, building nothing, when a prerequisite is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing() { echo "e2e/kind: $1" >&2; exit 2; }
command -v docker >/dev/null || missing "docker is not installed (https://docs.docker.com/engine/install/)"
docker info >/dev/null 2>&1 || missing "the Docker daemon is not reachable (start it, or check DOCKER_HOST and your permissions)"
command -v kind >/dev/null || missing "kind is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
if [[ ! -x .tools/bin/helm ]] && ! command -v helm >/dev/null; then bash scripts/install-helm.sh; fi
[[ -x .venv/bin/python ]] || missing "no virtualenv: run \`make venv\` first"
.venv/bin/python -c 'import kubernetes' 2>/dev/null \
  || missing "the kubernetes Python client is not installed: .venv/bin/python -m pip install kubernetes"

export TESSERA_E2E_KIND=1
exec .venv/bin/python -m pytest e2e/kind -v -rs -p no:cacheprovider "$@"
