#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine: Debian packages, a virtual
# environment and the Python dependencies. Idempotent; safe to run before every demo or test run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the real Prometheus (+ promtool), sshd for the GitLab host stand-in,
# the real container registry, the real etcd 3.4 (+ etcdctl) for the etcd lifecycle, and kubectl's peers are stand-ins in sandbox/.
APT_PACKAGES=(prometheus openssh-server docker-registry etcd-server etcd-client)
# kubectl, for tests/test_rbac.py's client dry run of configs/k8s/: Debian's kubernetes-client, unless a
# kubectl is on PATH already (a newer one from the Kubernetes packages is left alone)
command -v kubectl >/dev/null 2>&1 || APT_PACKAGES+=(kubernetes-client)
# PostgreSQL for the production-shaped Prefect server (tests/test_operator_path.py), headless Chromium
# for the UI screenshots (python -m scripts.screenshots)
APT_PACKAGES+=(postgresql chromium)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts these as system services where systemd runs; the sandbox starts its own.
  for svc in prometheus docker-registry ssh etcd postgresql; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "install: ok ($(.venv/bin/python -c 'import prefect; print("prefect", prefect.__version__)'))"
