#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks need, when missing. Idempotent: packages
# already installed are left alone and `apt-get update` runs at most once, only if one is missing.
#   nats-server  — replica-sync tests and `kvgate serve --processes N` (the bundled NATS server)
#   wrk          — `npm run bench:proxy:wrk` (HTTP load generator)
#   nginx-light  — `npm run bench:proxy:wrk` (fixed-answer upstream)
#   chromium     — the dashboard's browser test (driven by playwright-core, /usr/bin/chromium)
# kubectl (for the manifest tests' `kubectl kustomize`) comes with these machines; it is checked,
# not installed (Debian has no kubectl package).
# Run as root (CI does). As another user it only checks, and fails naming the command to run.
set -euo pipefail

PACKAGES=(nats-server wrk nginx-light chromium)

installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "setup-test-deps: dpkg-query not found: this script supports Debian/Ubuntu only." >&2
  echo "setup-test-deps: install these packages by hand: ${PACKAGES[*]}" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if installed "$p"; then
    echo "setup-test-deps: $p present"
  else
    missing+=("$p")
  fi
done

if command -v kubectl >/dev/null 2>&1; then
  echo "setup-test-deps: kubectl present"
else
  echo "setup-test-deps: kubectl not found: the manifest tests render deploy/k8s with 'kubectl kustomize'; install kubectl (1.27 or newer) on PATH" >&2
  exit 1
fi

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-test-deps: missing Debian packages: ${missing[*]}" >&2
  echo "setup-test-deps: run as root: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for p in "${missing[@]}"; do
  if installed "$p"; then
    echo "setup-test-deps: $p installed"
  else
    echo "setup-test-deps: $p could not be installed" >&2
    exit 1
  fi
done
