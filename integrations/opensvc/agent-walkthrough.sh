#!/usr/bin/env bash
# Runs both OpenSVC integrations through a real OpenSVC v2 agent, from an
# agent source tree you already have (opensvc/opensvc, branch b2.1):
#
#   bash integrations/opensvc/agent-walkthrough.sh /path/to/opensvc-b2.1
#
# It needs `make image` done (the hsev binaries in target/debug, the guest
# image in images/out), root, python3, unshare and nsenter. In a temporary
# folder it starts a throwaway pool: hsev-kbs in development mode and hsevd
# with a simulated AMD Secure Processor (NO confidentiality), QEMU guests.
# In the agent's tree (its state goes there: etc/, var/, log/) it creates two
# services from integrations/opensvc/examples, on this node only:
#
#   hsev-vault-app  an `app` resource of type `forking`, script hsev-opensvc
#   hsev-vault-box  a `container.hsev` resource (integrations/opensvc/driver)
#
# each holding a sev-snp VM with an encrypted disk, and drives them through
# start, print status --refresh, stop, provision and unprovision, first
# without the daemon (--local), then with it (the daemon in a pid namespace
# of its own). Everything it made is removed at the end, the services too.
set -euo pipefail

agent=${1:?usage: agent-walkthrough.sh AGENT_TREE (an opensvc/opensvc b2.1 source tree)}
agent=$(cd "$agent" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin="$root/target/debug"
image="$root/images/out"
for file in "$agent/opensvc/__main__.py" "$agent/opensvc/drivers/resource/app/forking/__init__.py"; do
  [ -f "$file" ] || { echo "walkthrough: $agent is not an OpenSVC v2 source tree ($file missing)" >&2; exit 2; }
done
for tool in hsev hsevd hsev-kbs hsev-opensvc; do
  [ -x "$bin/$tool" ] || { echo "walkthrough: $bin/$tool is missing: run \`make image\`" >&2; exit 2; }
done
[ -f "$image/manifest.json" ] || { echo "walkthrough: the guest image is missing: run \`make image\`" >&2; exit 2; }
for tool in python3 unshare nsenter; do
  command -v "$tool" >/dev/null || { echo "walkthrough: $tool is missing" >&2; exit 2; }
done

work=$(mktemp -d /tmp/hsev-opensvc.XXXXXX)
services=(hsev-vault-app hsev-vault-box)
node=$(python3 -c 'import socket; print(socket.gethostname().lower())')
mkdir -p "$agent/var/node" "$work/bin"
ln -s "$bin/hsev-opensvc" "$work/bin/hsev-opensvc"
# The agent, and the daemon it starts, find the launcher and the driver here.
export PATH="$work/bin:$PATH" PYTHONPATH="$here/driver${PYTHONPATH:+:$PYTHONPATH}"
unset HSEV_CONFIG HSEV_ENDPOINT HSEV_TOKEN HSEV_TOKEN_FILE HSEV_CA

endpoint="unix://$work/state/hsevd.sock"
om() { (cd "$agent" && python3 -m opensvc "$@"); }
hsev() { HSEV_ENDPOINT=$endpoint HSEV_TOKEN_FILE=$work/tenant.token XDG_CONFIG_HOME=$work "$bin/hsev" "$@"; }
say() { echo; echo "\$ om $*"; }
run() { say "$@"; om "$@" 2>&1 | grep -v '^  /bin/echo ' || true; }

daemon_running=false
cleanup() {
  local status=$?
  set +e
  if $daemon_running; then
    # The stop runs in the daemon's namespace, and ends killed with it when
    # the daemon (its pid 1) exits: that is expected, and not reported.
    nsenter --target "$(cat "$work/daemon.pid")" --pid --mount \
      sh -c "cd '$agent' && python3 -m opensvc daemon stop" >/dev/null 2>&1 &
    wait "$!" 2>/dev/null
    wait "$unshare_pid" 2>/dev/null
  fi
  for service in "${services[@]}"; do
    [ -f "$agent/etc/$service.conf" ] && om "$service" delete --local >/dev/null 2>&1
  done
  # VMs outlive hsevd by design: delete those left behind through it.
  if [ -n "${hsevd_pid:-}" ]; then
    for vm in $(hsev vm list --output json 2>/dev/null \
        | python3 -c 'import json, sys; print(" ".join(vm["id"] for vm in json.load(sys.stdin)))'); do
      hsev vm delete "$vm" --yes >/dev/null 2>&1
    done
  fi
  for pid in "${hsevd_pid:-}" "${kbs_pid:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
  done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

echo "## a throwaway pool (simulated AMD Secure Processor: NO confidentiality) in $work"
sha256() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
"$bin/hsev" firmware sim init --dir "$work/sim" >/dev/null 2>&1
"$bin/hsev-kbs" init --state-dir "$work/kbs" >/dev/null
(umask 077; printf 'walkthrough-kbs-admin\n' >"$work/kbs-admin.token"; printf 'walkthrough-tenant\n' >"$work/tenant.token")
cat >"$work/kbs.toml" <<EOF
listen = "127.0.0.1:0"
state_dir = "$work/kbs"
mode = "development"
simulated_roots = ["$work/sim"]
[[admin_tokens]]
name = "hsevd"
sha256 = "$(sha256 walkthrough-kbs-admin)"
EOF
"$bin/hsev-kbs" serve --config "$work/kbs.toml" >"$work/kbs.out" 2>"$work/kbs.log" &
kbs_pid=$!
for _ in $(seq 1 300); do grep -q '^hsev-kbs listening on ' "$work/kbs.out" && break; sleep 0.1; done
kbs_url=$(sed -n 's/^hsev-kbs listening on //p' "$work/kbs.out")
[ -n "$kbs_url" ] || { cat "$work/kbs.log" >&2; exit 1; }
cat >"$work/hsevd.toml" <<EOF
state_dir = "$work/state"
[firmware]
simulated_dir = "$work/sim"
[key_broker]
url = "$kbs_url"
admin_token_file = "$work/kbs-admin.token"
[[tokens]]
name = "ops"
role = "admin"
sha256 = "$(sha256 walkthrough-admin)"
[[tokens]]
name = "opensvc"
role = "tenant"
sha256 = "$(sha256 walkthrough-tenant)"
EOF
"$bin/hsevd" --config "$work/hsevd.toml" >"$work/hsevd.log" 2>&1 &
hsevd_pid=$!
for _ in $(seq 1 600); do [ -S "$work/state/hsevd.sock" ] && break; sleep 0.1; done
[ -S "$work/state/hsevd.sock" ] || { cat "$work/hsevd.log" >&2; exit 1; }
HSEV_ENDPOINT=$endpoint HSEV_TOKEN=walkthrough-admin XDG_CONFIG_HOME=$work \
  "$bin/hsev" image import debian --from "$image" 2>/dev/null | sed -n 's/^name:/image:/p'
echo "hsevd at $endpoint, hsev-kbs at $kbs_url, node $node"

# The examples, on this node, with this pool's endpoint and token file.
cat >"$work/pool.toml" <<EOF
endpoint = "$endpoint"
token_file = "$work/tenant.token"
EOF
sed 's/^name = "vault"/name = "vault-app"/' "$here/examples/vault.toml" >"$work/vault-app.toml"
sed -e "s|^nodes = .*|nodes = $node|" \
    -e "s|^script = .*|script = $work/bin/hsev-opensvc|" \
    -e "s|^environment = .*|environment = HSEV_SPEC=$work/vault-app.toml HSEV_ENDPOINT=$endpoint HSEV_TOKEN_FILE=$work/tenant.token HSEV_NODE={nodename}|" \
    "$here/examples/vault-app.conf" >"$work/hsev-vault-app.conf"
sed -e "s|^nodes = .*|nodes = $node|" \
    -e "s|^name = .*|name = vault-box|" \
    -e "s|^pool = .*|pool = $work/pool.toml|" \
    "$here/examples/vault-container.conf" >"$work/hsev-vault-box.conf"
for service in "${services[@]}"; do
  [ ! -f "$agent/etc/$service.conf" ] || { echo "walkthrough: $agent already has a service $service" >&2; exit 2; }
  om "$service" create --config "$work/$service.conf" >/dev/null 2>&1
done
echo "services: ${services[*]}; PYTHONPATH=$PYTHONPATH"

echo
echo "## without the daemon (--local)"
run hsev-vault-app print status --refresh
run hsev-vault-app start --local
run hsev-vault-app print status --refresh
say hsev-vault-app print resinfo '(the launcher'"'"'s info lines)'
om hsev-vault-app print resinfo --format json 2>/dev/null \
  | python3 -c 'import json, sys
shown = ("vm", "id", "state", "host", "mode", "expected_measurement", "launch_digest", "measurements", "attestation", "opensvc_node")
for row in json.load(sys.stdin):
    if isinstance(row, dict):
        row = [row.get(key) for key in ("res_svcname", "res_nodename", "topology", "rid", "res_key", "res_value")]
    if row[3] == "app#vm" and row[4] in shown:
        print("  %s: %s" % (row[4], row[5]))' || true
run hsev-vault-app start --local
run hsev-vault-app stop --local
run hsev-vault-app print status --refresh
run hsev-vault-app provision --local
run hsev-vault-app print status --refresh
run hsev-vault-app unprovision --local
run hsev-vault-app print status --refresh

run hsev-vault-box print status --refresh
run hsev-vault-box provision --local --leader
run hsev-vault-box print status --refresh
run hsev-vault-box stop --local
run hsev-vault-box print status --refresh
run hsev-vault-box start --local
run hsev-vault-box print status --refresh
run hsev-vault-box unprovision --local --leader
run hsev-vault-box print status --refresh
echo; echo "\$ hsev vm list"; hsev vm list 2>&1 || true

echo
echo "## with the daemon (in a pid namespace of its own)"
if om daemon running >/dev/null 2>&1; then
  echo "walkthrough: a daemon already runs for $agent: stop it first" >&2
  exit 2
fi
# The daemon's pid file says 1 (its pid in its namespace), and a new daemon
# would take itself for it.
rm -f "$agent/var/osvcd.pid"
(cd "$agent" && exec unshare --pid --fork --mount-proc python3 -m opensvc daemon start --foreground) \
  >"$work/daemon.log" 2>&1 &
unshare_pid=$!
for _ in $(seq 1 100); do
  daemon_pid=$(pgrep -P "$unshare_pid" || true)
  [ -n "$daemon_pid" ] && break
  sleep 0.1
done
echo "$daemon_pid" >"$work/daemon.pid"
daemon_running=true
for _ in $(seq 1 120); do
  om daemon status 2>/dev/null | grep -q '^ monitor *running' && break
  [ -n "$(pgrep -P "$unshare_pid")" ] || { cat "$work/daemon.log" >&2; exit 1; }
  sleep 1
done

# settle SERVICE AVAIL: until the daemon's instance is idle with that status.
settle() {
  for _ in $(seq 1 120); do
    if om "$1" print status --format json 2>/dev/null | python3 -c 'import json, sys
data = json.load(sys.stdin)
sys.exit(0 if data.get("avail") == sys.argv[1] and data.get("monitor", {}).get("status") == "idle" else 1)' "$2"; then
      return 0
    fi
    sleep 1
  done
  echo "walkthrough: $1 did not settle $2" >&2
  return 1
}
run daemon status
run hsev-vault-app start --wait
settle hsev-vault-app up
run hsev-vault-app print status --refresh
run hsev-vault-app stop --wait
settle hsev-vault-app down
run hsev-vault-app print status --refresh
run hsev-vault-app provision --wait
settle hsev-vault-app up
run hsev-vault-app print status --refresh
# An app resource provisions nothing: `provision` starts it, `unprovision`
# stops it (as --local did above), and the daemon never sees an app-only
# service `unprovisioned`, so it keeps retrying: stop it instead.
run hsev-vault-app stop --wait
settle hsev-vault-app down
run hsev-vault-app print status --refresh

run hsev-vault-box provision --wait
settle hsev-vault-box up
run hsev-vault-box print status --refresh
run hsev-vault-box stop --wait
settle hsev-vault-box down
run hsev-vault-box print status --refresh
run hsev-vault-box start --wait
settle hsev-vault-box up
run hsev-vault-box print status --refresh
run hsev-vault-box unprovision --wait
settle hsev-vault-box down
run hsev-vault-box print status --refresh
echo; echo "\$ om hsev-vault-box logs (the launcher's lines, as the daemon ran it)"
om hsev-vault-box logs --no-pager 2>/dev/null | grep -E 'daemon origin|hsev-opensvc|\| [a-z]' | tail -40 || true
echo; echo "\$ hsev vm list"; hsev vm list 2>&1 || true
echo; echo "\$ hsev-kbs audit verify"; "$bin/hsev-kbs" audit verify --state-dir "$work/kbs" 2>&1 | tail -2
