#!/usr/bin/env bash
# Tapestry end to end on this machine: a one-node cluster (`tapestry up`,
# embedded store, real containers) whose fleet manager deploys the eBPF taps
# and the aggregator by itself; web pods, another pod and a client; a tool
# and a tap policy created through the fleet manager's REST API with curl;
# tshark printing only the web pods' HTTP over PCAP-over-IP.
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
FLEET="${FLEET:-127.0.0.1:8443}"
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

step "Building the busybox:local image (the node builds its tap-agent and aggregator images itself)"
ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
mkdir -p "$ROOTFS/bin" "$ROOTFS/etc" "$ROOTFS/tmp" "$ROOTFS/var/www"
cp /bin/busybox "$ROOTFS/bin/"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$ROOTFS/bin/$applet"
done
echo "hello from a tapped pod" > "$ROOTFS/var/www/index.html"
"$BIN/tapestry" image build busybox:local --rootfs "$ROOTFS" --cmd sh --data-dir "$DATA_DIR"

step "Starting the cluster: tapestry up --data-dir $DATA_DIR --fleet-manager-listen $FLEET"
"$BIN/tapestry" up --data-dir "$DATA_DIR" --fleet-manager-listen "$FLEET" >"$DATA_DIR/up.log" 2>&1 &
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
for _ in $(seq 1 300); do
  grep -q '^fleet manager:' "$DATA_DIR/up.log" 2>/dev/null && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$DATA_DIR/up.log"; exit 1; }
  sleep 0.1
done
grep -E '^(kubeconfig|fleet manager):' "$DATA_DIR/up.log"
export KUBECONFIG="$DATA_DIR/kubeconfig"
kubectl wait --for=condition=Ready node --all --timeout=60s

step "The fleet manager deployed the taps and the aggregator on its own"
kubectl -n tapestry-system rollout status daemonset/tap-agent --timeout=120s
kubectl -n tapestry-system rollout status deployment/aggregator --timeout=120s

step "Deploying: web (2 replicas), other, then a client of all three"
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
        command: [httpd, -f, -p, "80", -h, /var/www]
        readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 2}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop, labels: {app: other}}
spec:
  containers:
  - name: httpd
    image: busybox:local
    imagePullPolicy: Never
    command: [httpd, -f, -p, "80", -h, /var/www]
EOF
kubectl -n shop rollout status deployment/web --timeout=120s
kubectl -n shop wait --for=condition=Ready pod/other --timeout=60s
# No Service proxy yet: the client fetches from the pods' IPs.
TARGET_IPS="$(kubectl -n shop get pods -o jsonpath='{.items[*].status.podIP}')"
kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  containers:
  - name: wget
    image: busybox:local
    imagePullPolicy: Never
    env: [{name: TARGETS, value: "$TARGET_IPS"}]
    command: [sh, -c, 'while true; do for ip in \$TARGETS; do wget -q -O /dev/null http://\$ip/; done; sleep 1; done']
EOF
kubectl -n shop wait --for=condition=Ready pod/client --timeout=60s
kubectl get pods -A -o wide

step "A tool and a policy through the fleet manager's REST API (https://$FLEET)"
TOKEN="$(grep ',admin,' "$DATA_DIR/tokens.csv" | cut -d, -f1)"
api() {
  curl -sS --fail-with-body --cacert "$DATA_DIR/pki/ca.crt" -H "Authorization: Bearer $TOKEN" "$@"
  echo
}
echo '$ curl https://'"$FLEET"'/v1/tools -d {"name": "wireshark", "type": "pcapOverIp", ...}'
api "https://$FLEET/v1/tools" -d '{"name": "wireshark", "type": "pcapOverIp", "listen": "127.0.0.1:57012"}'
echo '$ curl https://'"$FLEET"'/v1/policies -d {"name": "web-http", ...}'
api "https://$FLEET/v1/policies" -d '{"name": "web-http", "namespaces": ["shop"],
  "podSelector": {"matchLabels": {"app": "web"}}, "rules": [{"protocol": "tcp", "ports": ["80"]}],
  "filter": "tcp port 80", "slice": {"payload": 128}, "tools": ["wireshark"]}'
kubectl wait --for=condition=Ready taptool/wireshark --timeout=30s

step "The web pods' HTTP, and nothing of 'other', as tshark sees it over PCAP-over-IP (10 s)"
tshark -i TCP@127.0.0.1:57012 -a duration:10 -Y http 2>/dev/null | head -n 20 || true

step "The fleet, as the REST API and kubectl show it"
api "https://$FLEET/v1/nodes"
kubectl get tappolicies,taptools

cat <<EOF

The cluster keeps running. In another shell:
  export KUBECONFIG=$KUBECONFIG TOKEN=\$(grep ',admin,' $DATA_DIR/tokens.csv | cut -d, -f1)
  curl --cacert $DATA_DIR/pki/ca.crt -H "Authorization: Bearer \$TOKEN" https://$FLEET/v1/policies
  tshark -i TCP@127.0.0.1:57012          # the web pods' traffic, live
  kubectl get tappolicies,taptools
The API is described at https://$FLEET/docs and https://$FLEET/openapi.json.
Ctrl-C here stops the cluster and cleans up.
EOF
wait "$UP_PID"
