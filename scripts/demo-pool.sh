#!/usr/bin/env bash
# The pool chapter of `make demo`: three hosts, each its own network
# namespace (a veth into one bridge, its own address), hsevd and simulated
# AMD Secure Processor. h1 makes the pool and coordinates it; h2 and h3 join
# it with single-use tokens over mTLS. Three SEV-SNP VMs (real QEMU guests)
# are placed, each with the coordinator's reasons; then h2 goes into
# maintenance, its VM is cold-migrated (a new launch on another chip), and
# the chapter shows where each VM went.
#
# Its last line is `pool_evacuated=true` when every VM runs and none is left
# on h2; the exit status is 0 only then. Run as root (it makes namespaces).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/hsevd-config.sh"
hsev="$root/target/debug/hsev"
hsevd="$root/target/debug/hsevd"
image="$root/images/out"
[ -f "$image/manifest.json" ] || { echo "demo-pool: the guest image is missing: run \`make image\`" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "demo-pool: network namespaces need root" >&2; exit 1; }

# A network of its own, apart from the tests' 10.77.x.0/24 ones.
subnet=10.78.0
bridge=hsdemo0
work=$(mktemp -d)
ops_token=demo-pool-operator-token
alice_token=demo-pool-tenant-token
hosts=(h1 h2 h3)
evacuated=false

remove_net() {
  for host in "${hosts[@]}"; do ip netns delete "hsev-demo-$host" 2>/dev/null || true; done
  ip link delete "$bridge" 2>/dev/null || true
}
cleanup() {
  local status=$?
  for host in "${hosts[@]}"; do
    if [ -f "$work/$host/pid" ]; then kill "$(cat "$work/$host/pid")" 2>/dev/null || true; fi
  done
  # VMs outlive hsevd by design: stop any the chapter left behind.
  pgrep -f "$work/h[123]/state/vms" | xargs -r kill -9 2>/dev/null || true
  sleep 0.5
  remove_net
  rm -rf "$work"
  echo "pool_evacuated=$evacuated"
  if [ "$status" = 0 ] && [ "$evacuated" != true ]; then status=1; fi
  exit "$status"
}
trap cleanup EXIT
step() { echo; echo "## $*"; }
export HSEV_ENDPOINT="unix://$work/h1/state/hsevd.sock" XDG_CONFIG_HOME="$work"
unset HSEV_CONFIG
operator() { HSEV_TOKEN=$ops_token "$hsev" "$@"; }
tenant() { HSEV_TOKEN=$alice_token "$hsev" "$@"; }

# add_host NAME INDEX: a namespace, its veth into the bridge, an address.
add_host() {
  local name=$1 index=$2 ns="hsev-demo-$1"
  ip netns add "$ns"
  ip link add "hsd$index" type veth peer name "hsd${index}p"
  ip link set "hsd$index" master "$bridge" up
  ip link set "hsd${index}p" netns "$ns"
  ip -n "$ns" addr add "$subnet.1$index/24" dev "hsd${index}p"
  ip -n "$ns" link set "hsd${index}p" up
  ip -n "$ns" link set lo up
  ip -n "$ns" route add default via "$subnet.1"
}

# configure NAME INDEX LABEL COORDINATOR_TABLES: the host's folder and
# hsevd.toml.
configure() {
  local name=$1 index=$2 label=$3 tables=$4 dir="$work/$1"
  mkdir -p "$dir"
  "$hsev" firmware sim init --dir "$dir/sim" >/dev/null
  cat >"$dir/hsevd.toml" <<TOML
state_dir = "$dir/state"
driver = "qemu"
host_name = "$name"
labels = ["$label"]
[pool]
listen = "$subnet.1$index:7444"
heartbeat_ms = 500
down_after_ms = 3000
$tables
$(hsevd_sim_and_tokens "$dir/sim" "$ops_token" "$alice_token")
TOML
}

# run NAME: its hsevd in its namespace, until its socket answers.
run() {
  local dir="$work/$1"
  ip netns exec "hsev-demo-$1" "$hsevd" --config "$dir/hsevd.toml" >"$dir/hsevd.log" 2>&1 &
  echo $! >"$dir/pid"
  for _ in $(seq 1 600); do [ -S "$dir/state/hsevd.sock" ] && return 0; sleep 0.1; done
  cat "$dir/hsevd.log" >&2
  return 1
}

# wait_ready VM COUNT: until the guest answers attestation requests COUNT
# times on its console (the console follows the VM from host to host).
wait_ready() {
  for _ in $(seq 1 360); do
    [ "$(tenant vm console "$1" | grep -c 'answering attestation requests')" -ge "$2" ] && return 0
    sleep 0.5
  done
  echo "demo-pool: the guest of $1 never came up" >&2
  tenant vm console "$1" | tail -20 >&2
  return 1
}
host_of() { tenant vm show "$1" --output json | python3 -c 'import json, sys; print(json.load(sys.stdin)["host"])'; }

step "7. a pool of three hosts, each its own network namespace, hsevd and simulated Secure Processor"
remove_net
ip link add "$bridge" type bridge
ip addr add "$subnet.1/24" dev "$bridge"
ip link set "$bridge" up
for index in 1 2 3; do
  name=${hosts[$((index - 1))]}
  add_host "$name" "$index"
  tables=""
  # The coordinator's placement trusts simulated platforms: a development pool.
  [ "$index" = 1 ] && tables=$'[placement]\nallow_simulated = true'
  zone=zone=a
  [ "$index" = 3 ] && zone=zone=b
  configure "$name" "$index" "$zone" "$tables"
  if [ "$index" != 1 ]; then
    token=$(operator pool join-token create --output json | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
    ip netns exec "hsev-demo-$name" "$hsevd" --config "$work/$name/hsevd.toml" join "$token" | sed 's/^/  /'
  fi
  run "$name"
  echo "$name: hsevd up at $subnet.1$index, labelled $zone"
done
for _ in $(seq 1 100); do
  [ "$(operator host list --output json | python3 -c 'import json, sys; print(sum(h["status"] == "up" for h in json.load(sys.stdin)))')" = 3 ] && break
  sleep 0.2
done
operator host list
operator image import debian --from "$image" >/dev/null

step "   three SEV-SNP VMs, placed by the coordinator, each with its reasons (c must run in zone b)"
for vm in a b c; do
  where=()
  [ "$vm" = c ] && where=(--host-label zone=b)
  echo "tenant: hsev vm create $vm --mode sev-snp ${where[*]} --start --explain"
  tenant vm create "$vm" --image debian --vcpus 1 --memory 512 --mode sev-snp "${where[@]}" --start --explain \
    --output json 2>&1 >/dev/null | grep -v '^\[' | sed 's/^/  /'
done
for vm in a b c; do wait_ready "$vm" 1; done
tenant vm list

step "   h2 into maintenance: its VM is cold-migrated, a new launch on another host's chip"
declare -A before
for vm in a b c; do before[$vm]=$(host_of "$vm"); done
operator host maintenance enter h2
for vm in a b c; do
  [ "${before[$vm]}" = h2 ] && wait_ready "$vm" 1
done
echo
for vm in a b c; do
  now=$(host_of "$vm")
  if [ "$now" = "${before[$vm]}" ]; then
    echo "$vm: stayed on $now"
  else
    echo "$vm: ${before[$vm]} -> $now, as placement decided:"
    tenant vm show "$vm" --output json | python3 -c 'import json, sys; print(json.load(sys.stdin)["placement"])' |
      sed 's/^/  /'
  fi
done
operator host list
tenant vm list
states=$(tenant vm list --output json | python3 -c 'import json, sys
vms = json.load(sys.stdin)
print(all(vm["state"] == "running" for vm in vms) and len(vms) == 3 and not any(vm["host"] == "h2" for vm in vms))')
[ "$states" = True ] && evacuated=true
operator host maintenance exit h2 >/dev/null
