#!/usr/bin/env bash
# Tapestry end to end on this machine: a one-node cluster (`tapestry up`,
# embedded store, real containers), a web server and a client as pods, a
# tap-agent DaemonSet that mirrors the web pods' packets with eBPF, and an
# aggregator that filters them and serves them to tshark over PCAP-over-IP.
#
# Run as root: sudo scripts/demo.sh   (DATA_DIR=/tmp/tapestry-demo by default)
# It leaves the cluster running; Ctrl-C stops every pod and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: run as root (containers, pod networking and eBPF need it)" >&2
  exit 1
fi
DATA_DIR="${DATA_DIR:-/tmp/tapestry-demo}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/release"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Installing system packages (runc, CNI plugins, busybox, tshark, ...)"
scripts/deps.sh >/dev/null

step "Building tapestry, tap-agent and aggregator (release)"
cargo build --release --locked -p tapestry -p tapestry-tap-agent -p tapestry-aggregator \
  --bin tapestry --bin tapestry-shim --bin tap-agent --bin aggregator

if [ -f "$DATA_DIR/up.pid" ] && kill -0 "$(cat "$DATA_DIR/up.pid")" 2>/dev/null; then
  step "Stopping the cluster a previous run left in $DATA_DIR"
  kill "$(cat "$DATA_DIR/up.pid")"
  while kill -0 "$(cat "$DATA_DIR/up.pid")" 2>/dev/null; do sleep 0.2; done
fi
# Each run starts from an empty cluster; only a directory this script made
# (or an empty one) is cleared.
if [ -e "$DATA_DIR/store.redb" ]; then
  # Never through a container's rootfs or volume left mounted under it.
  rm -rf --one-file-system "$DATA_DIR"
elif [ -d "$DATA_DIR" ] && [ -n "$(ls -A "$DATA_DIR")" ]; then
  echo "demo.sh: $DATA_DIR exists and is not a Tapestry data directory; set DATA_DIR" >&2
  exit 1
fi
mkdir -p "$DATA_DIR"

step "Building images: busybox:local, tapestry/tap-agent:demo, tapestry/aggregator:demo"
ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
mkdir -p "$ROOTFS/bb/bin" "$ROOTFS/bb/etc" "$ROOTFS/bb/tmp" "$ROOTFS/bb/var/www"
cp /bin/busybox "$ROOTFS/bb/bin/"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$ROOTFS/bb/bin/$applet"
done
echo "hello from a tapped pod" > "$ROOTFS/bb/var/www/index.html"
"$BIN/tapestry" image build busybox:local --rootfs "$ROOTFS/bb" --cmd sh --data-dir "$DATA_DIR"
# A binary and the shared libraries ldd lists, at their paths.
binary_image() {
  local name=$1 exe=$2 root="$ROOTFS/$1"
  mkdir -p "$root/bin" "$root/tmp"
  cp "$exe" "$root/bin/"
  for lib in $(ldd "$exe" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  "$BIN/tapestry" image build "tapestry/$name:demo" --rootfs "$root" \
    --cmd "/bin/$(basename "$exe")" --data-dir "$DATA_DIR"
}
binary_image tap-agent "$BIN/tap-agent"
binary_image aggregator "$BIN/aggregator"

step "Starting the cluster: tapestry up --data-dir $DATA_DIR"
"$BIN/tapestry" up --data-dir "$DATA_DIR" >"$DATA_DIR/up.log" 2>&1 &
UP_PID=$!
echo "$UP_PID" > "$DATA_DIR/up.pid"
stop_cluster() {
  trap - INT TERM
  echo
  step "Stopping the cluster (every pod is stopped and cleaned up)"
  kill "$UP_PID" 2>/dev/null || true
  wait "$UP_PID" 2>/dev/null || true
  rm -f "$DATA_DIR/up.pid"
}
trap 'stop_cluster; exit 0' INT TERM
for _ in $(seq 1 100); do
  grep -q '^kubeconfig:' "$DATA_DIR/up.log" 2>/dev/null && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$DATA_DIR/up.log"; exit 1; }
  sleep 0.1
done
export KUBECONFIG="$DATA_DIR/kubeconfig"
kubectl wait --for=condition=Ready node --all --timeout=60s

step "Deploying: web (2 replicas), aggregator, tap-agent DaemonSet, then a client"
kubectl apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: httpd
        image: busybox:local
        imagePullPolicy: Never
        command: [httpd, -f, -p, "8080", -h, /var/www]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 2}
---
apiVersion: v1
kind: Namespace
metadata: {name: tapestry-system}
---
apiVersion: v1
kind: Pod
metadata: {name: aggregator, namespace: tapestry-system, labels: {app: aggregator}}
spec:
  hostNetwork: true
  containers:
  - name: aggregator
    image: tapestry/aggregator:demo
    imagePullPolicy: Never
    command: [/bin/aggregator]
    args: [serve, --grpc, "127.0.0.1:50051", --http, "127.0.0.1:9090",
           --pcap-over-ip, "127.0.0.1:57012", --filter, "tcp port 8080"]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: tap-policies, namespace: tapestry-system}
data:
  policies.json: |
    [{"name": "web", "namespace": "shop", "selector": {"matchLabels": {"app": "web"}}}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: tap-agent, namespace: tapestry-system}
spec:
  selector: {matchLabels: {app: tap-agent}}
  template:
    metadata: {labels: {app: tap-agent}}
    spec:
      hostNetwork: true
      containers:
      - name: tap-agent
        image: tapestry/tap-agent:demo
        imagePullPolicy: Never
        securityContext: {privileged: true}
        env:
        - name: NODE_NAME
          valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
        command: [/bin/tap-agent]
        args: [run, --kubeconfig, /etc/tapestry/kubeconfig, --node, "\$(NODE_NAME)",
               --policy-file, /etc/tap/policies.json, --aggregator, "http://127.0.0.1:50051"]
        volumeMounts:
        - {name: kubeconfig, mountPath: /etc/tapestry/kubeconfig, readOnly: true}
        - {name: policies, mountPath: /etc/tap, readOnly: true}
      volumes:
      - name: kubeconfig
        hostPath: {path: $DATA_DIR/kubeconfig, type: File}
      - name: policies
        configMap: {name: tap-policies}
EOF
kubectl -n shop rollout status deployment/web --timeout=120s
# No Service proxy yet: the client fetches from the web pods' IPs.
WEB_IPS="$(kubectl -n shop get pods -l app=web -o jsonpath='{.items[*].status.podIP}')"
kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  containers:
  - name: wget
    image: busybox:local
    imagePullPolicy: Never
    env: [{name: TARGETS, value: "$WEB_IPS"}]
    command: [sh, -c, 'while true; do for ip in \$TARGETS; do wget -q -O /dev/null http://\$ip:8080/; done; sleep 1; done']
EOF
kubectl -n shop wait --for=condition=Ready pod/client --timeout=60s
kubectl -n tapestry-system wait --for=condition=Ready pod/aggregator --timeout=60s
kubectl -n tapestry-system rollout status daemonset/tap-agent --timeout=60s
kubectl get pods -A -o wide

step "Live traffic of the web pods, as tshark sees it over PCAP-over-IP (10 s)"
sleep 3
tshark -i TCP@127.0.0.1:57012 -a duration:10 -Y http 2>/dev/null | head -n 20 || true

cat <<EOF

The cluster keeps running. In another shell:
  export KUBECONFIG=$KUBECONFIG
  kubectl get pods -A -o wide
  tshark -i TCP@127.0.0.1:57012              # the web pods' traffic, live
  curl -s http://127.0.0.1:9090/metrics      # aggregator counters
Ctrl-C here stops the cluster and cleans up.
EOF
wait "$UP_PID"
