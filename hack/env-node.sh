# The real node of the local environment (sourced by hack/env when it runs with
# --real-node): containerd + runc (Debian's packages), the kubelet (built from the
# pinned k8s.io/kubernetes) and bridge CNI for Pods, all inside a network namespace
# that hack/env creates for this environment only.
#
# Network: the namespace has a bridge (op0, 10.88.0.1/16) and nothing that routes
# out of it. The control plane, NATS and Jaeger stay on the host's 127.0.0.1;
# hack/node-proxy.py is the only bridge between the two:
#   Pods and the kubelet -> 10.88.0.1:{6443,4222,4317,4318} -> the host's 127.0.0.1
#   (and 4223 -> nats-op with --nats-operator-mode)
#   Pods -> 10.96.0.1:443 (the `kubernetes` Service) -> DNAT to 10.88.0.1:6443
#   API server -> kubelet and Pods (logs, exec, port-forward) -> its egress selector
#   -> a CONNECT proxy on a unix socket -> dialled from inside the namespace.
# So nothing in the host's namespace dials anything but loopback.
#
# Host state it touches, all undone by `hack/env down`: the namespace
# (/run/netns/$NODE_NETNS), cgroups under /$NODE_NETNS in every hierarchy, mounts
# under $STATE/kubelet, three sysctls the kubelet sets (saved in $STATE/sysctls), and
# /var/log/containers links into $STATE/pod-logs.

NODE_IP=10.88.0.1
NODE_NAME=orderpipeline-node
GOMODCACHE_DIR=$(go env GOMODCACHE 2>/dev/null || echo "$HOME/go/pkg/mod")

node_netns() { echo "orderpipeline-$(echo "$STATE" | sha256sum | cut -c1-8)"; }
in_node() { nsenter --net="/run/netns/$NODE_NETNS" "$@"; }

node_preflight() {
  [ "$(id -u)" = 0 ] || die "--real-node needs root (network namespace, cgroups, mounts)"
  local c missing=()
  for c in containerd runc ctr nsenter ip iptables buildah gcc; do command -v $c >/dev/null || missing+=("$c"); done
  [ -x /usr/lib/cni/bridge ] || missing+=("/usr/lib/cni/bridge")
  [ ${#missing[@]} -eq 0 ] || die "--real-node needs ${missing[*]}: run 'hack/setup-node' (apt-get install containerd runc containernetworking-plugins buildah iptables gcc libc6-dev)"
}

node_pki() { # the kubelet's client and the API server's kubelet client certificates
  local d="$STATE/pki"
  [ -f "$d/.node-complete" ] && return 0
  (
    cd "$d"
    for pair in "kubelet|/O=system:nodes/CN=system:node:$NODE_NAME" "apiserver-kubelet-client|/O=system:masters/CN=kube-apiserver-kubelet-client"; do
      local name=${pair%%|*} subj=${pair#*|}
      openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
      printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=clientAuth" > "$name.ext"
      openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$name.crt" -days 3650 -extfile "$name.ext" 2>/dev/null
      rm -f "$name.csr" "$name.ext"
    done
  )
  touch "$d/.node-complete"
}

apiserver_node_flags() { # extra kube-apiserver flags when the environment has the real node
  [ "${REAL_NODE:-0}" = 1 ] || return 0
  cat > "$STATE/egress.yaml" <<EOF
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: $STATE/node-egress.sock
EOF
  echo "--egress-selector-config-file $STATE/egress.yaml --kubelet-preferred-address-types InternalIP"
  echo "--kubelet-client-certificate $STATE/pki/apiserver-kubelet-client.crt --kubelet-client-key $STATE/pki/apiserver-kubelet-client.key"
}

node_netns_up() {
  NODE_NETNS=$(node_netns)
  echo "$NODE_NETNS" > "$STATE/node-netns"
  [ -e "/run/netns/$NODE_NETNS" ] || ip netns add "$NODE_NETNS"
  ip -n "$NODE_NETNS" link set lo up
  if ! ip -n "$NODE_NETNS" link show op0 >/dev/null 2>&1; then
    ip -n "$NODE_NETNS" link add op0 type bridge
    ip -n "$NODE_NETNS" addr add "$NODE_IP/16" dev op0
  fi
  ip -n "$NODE_NETNS" link set op0 up
  # Service addresses from the namespace itself (the kubelet's own probes of a
  # ClusterIP would need it; Pods route them through their default gateway).
  ip -n "$NODE_NETNS" route replace 10.96.0.0/16 dev op0
  # The `kubernetes` Service, as kube-proxy would program it (this environment
  # runs no kube-proxy; see docs/src/environment/real-node.md).
  in_node iptables -t nat -C PREROUTING -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:6443" 2>/dev/null ||
    in_node iptables -t nat -A PREROUTING -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:6443"
  in_node iptables -t nat -C OUTPUT -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:6443" 2>/dev/null ||
    in_node iptables -t nat -A OUTPUT -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:6443"
}

start_node_proxy() {
  # Up twice: a running proxy already wrote its ready file.
  running node-proxy && [ -f "$STATE/node-proxy.ready" ] && return 0
  rm -f "$STATE/node-proxy.ready"
  local op=()
  [ "${NATS_OP:-0}" = 1 ] && op=(--forward "4223=$NATS_OP_PORT")
  spawn node-proxy python3 "$here/node-proxy.py" --netns "/run/netns/$NODE_NETNS" \
    --forward "6443=$APISERVER_PORT" --forward "4222=$NATS_PORT" "${op[@]}" \
    --forward "4317=$OTLP_GRPC_PORT" --forward "4318=$OTLP_HTTP_PORT" \
    --egress "$STATE/node-egress.sock" --ready-file "$STATE/node-proxy.ready"
  wait_for "node-proxy" 30 test -f "$STATE/node-proxy.ready"
}

start_containerd() {
  local d="$STATE/containerd"
  mkdir -p "$d" "$STATE/cni/net.d" "$STATE/cni/data"
  cat > "$STATE/cni/net.d/10-orderpipeline.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "orderpipeline",
  "plugins": [
    {"type": "bridge", "bridge": "op0", "isGateway": true, "isDefaultGateway": true, "hairpinMode": true, "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "$STATE/cni/data",
              "ranges": [[{"subnet": "10.88.0.0/16", "rangeStart": "10.88.1.1", "gateway": "$NODE_IP"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat > "$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "orderpipeline.local/pause:3.10"
  # This VM refuses a negative oom_score_adj; without it runc fails every sandbox
  # with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
EOF
  spawn containerd nsenter --net="/run/netns/$NODE_NETNS" containerd --config "$d/config.toml"
  wait_for "containerd" 60 ctr --address "$d/containerd.sock" version
  node_import "$("$here/image" pause)"
}

node_import() { # OCI archive -> the node's containerd (the archive carries the image's name)
  ctr --address "$STATE/containerd/containerd.sock" -n k8s.io images import --all-platforms "$1" >/dev/null
}

start_kubelet() {
  local d="$STATE/kubelet" p="$STATE/pki" s
  mkdir -p "$d" "$STATE/pod-logs"
  if [ ! -f "$STATE/sysctls" ]; then # restored by `down`
    for s in vm.overcommit_memory kernel.panic kernel.panic_on_oops; do echo "$s=$(sysctl -n "$s")"; done > "$STATE/sysctls"
  fi
  cat > "$STATE/kubeconfig-kubelet" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: $p/ca.crt}
users:
- name: kubelet
  user: {client-certificate: $p/kubelet.crt, client-key: $p/kubelet.key}
contexts:
- name: local
  context: {cluster: local, user: kubelet}
current-context: local
EOF
  cat > "$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $p/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$STATE/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_NETNS
failCgroupV1: false
failSwapOn: false
resolvConf: ""
podLogsDir: $STATE/pod-logs
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
maxPods: 50
EOF
  # The node's cgroup root, one per environment, in every v1 hierarchy.
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h" ] && [ ! -L "${h%/}" ] || continue
    mkdir -p "$h$NODE_NETNS"
    if [ -f "${h}cpuset.cpus" ]; then
      cat "${h}cpuset.cpus" > "$h$NODE_NETNS/cpuset.cpus"; cat "${h}cpuset.mems" > "$h$NODE_NETNS/cpuset.mems"
    fi
  done
  spawn kubelet nsenter --net="/run/netns/$NODE_NETNS" "$BIN/kubelet" --config "$STATE/kubelet.yaml" \
    --kubeconfig "$STATE/kubeconfig-kubelet" --root-dir "$d" --cert-dir "$d/pki" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
  wait_for "the real node $NODE_NAME Ready" 120 node_ready
}

node_ready() {
  [ "$(kctl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

start_real_node() {
  NODE_NETNS=$(node_netns)
  node_pki
  node_netns_up
  start_node_proxy
  start_containerd
  start_kubelet
}

node_down() { # after the kubelet and containerd have stopped
  [ -f "$STATE/node-netns" ] || return 0
  NODE_NETNS=$(cat "$STATE/node-netns")
  local m c f
  # Containers the kubelet left: containerd is gone, so their shims are orphans.
  for f in "$STATE"/containerd/state/io.containerd.runtime.v2.task/k8s.io/*/init.pid; do
    [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  pkill -KILL -f "containerd-shim-runc-v2 -namespace k8s.io .*-address $STATE/containerd/containerd.sock" 2>/dev/null || true
  # Mounts under the state directory, deepest first.
  for m in $(awk -v s="$STATE/" 'index($2, s) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for c in /sys/fs/cgroup/*/"$NODE_NETNS"; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  if [ -f "$STATE/sysctls" ]; then
    while IFS== read -r k v; do sysctl -qw "$k=$v" || true; done < "$STATE/sysctls"
  fi
  for f in /var/log/containers/*; do
    [ -L "$f" ] && case $(readlink "$f") in "$STATE"/*) rm -f "$f" ;; esac
  done
  for f in /run/netns/cni-*; do # the Pods' namespaces (containerd normally removes them)
    [ -e "$f" ] && ! ip netns pids "$(basename "$f")" 2>/dev/null | grep -q . && ip netns delete "$(basename "$f")" 2>/dev/null || true
  done
  ip netns delete "$NODE_NETNS" 2>/dev/null || true
}

node_kill_containers() { # before containerd stops: the kubelet is gone, nobody else would
  running containerd || return 0
  local a="$STATE/containerd/containerd.sock" t
  for t in $(ctr --address "$a" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$a" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
  done
}
