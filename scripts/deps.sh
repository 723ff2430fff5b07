#!/usr/bin/env bash
# Installs the Debian packages Tapestry's build and tests use (idempotent).
set -euo pipefail
packages=(
  build-essential pkg-config ca-certificates curl iproute2 util-linux
  protobuf-compiler libpcap-dev clang libbpf-dev linux-libc-dev
  tcpdump tshark wireshark-common bpftool iperf3
  runc containernetworking-plugins iptables busybox-static nftables procps bsdutils
  etcd-server python3-venv
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y "${missing[@]}"
fi
# The API conformance test (tests/openapi.rs) runs these from a venv of their
# own, pinned so that a new release cannot change what passes.
venv=/var/cache/tapestry/venv
python_tools=(schemathesis==4.32.5 openapi-spec-validator==0.9.0)
pinned_present() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "${python_tools[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
PY
}
if ! pinned_present; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing in $venv: ${python_tools[*]} (run as root to install them)" >&2
    exit 1
  fi
  # Debian's python3, the one python3-venv is for, whatever else is on PATH;
  # a venv whose interpreter no longer runs is made again.
  "$venv/bin/python" -c '' 2>/dev/null || /usr/bin/python3 -m venv --clear "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${python_tools[@]}"
  pinned_present || { echo "$venv: ${python_tools[*]} did not install" >&2; exit 1; }
fi
if ! command -v kubectl >/dev/null 2>&1; then
  echo "kubectl is required for the end-to-end tests and is not on PATH" >&2
  exit 1
fi
