#!/usr/bin/env bash
# Installs the Debian packages Tapestry's build and tests use (idempotent).
set -euo pipefail
packages=(
  build-essential pkg-config ca-certificates curl iproute2 util-linux
  protobuf-compiler libpcap-dev clang libbpf-dev linux-libc-dev
  tcpdump tshark wireshark-common bpftool iperf3
  runc containernetworking-plugins iptables busybox-static nftables procps bsdutils
  etcd-server
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
if ! command -v kubectl >/dev/null 2>&1; then
  echo "kubectl is required for the end-to-end tests and is not on PATH" >&2
  exit 1
fi
