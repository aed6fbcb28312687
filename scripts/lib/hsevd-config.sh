# Sourced, not run: the parts of a demo hsevd.toml that every demo host
# shares.
#
# `sha256 TEXT` prints the hex SHA-256 of TEXT (a token's, as hsevd.toml
# records it). `hsevd_sim_and_tokens SIM_DIR ADMIN_TOKEN TENANT_TOKEN`
# prints the [firmware] table of a simulated Secure Processor in SIM_DIR and
# the [[tokens]] of the admin `ops` and the tenant `alice`, holding
# ADMIN_TOKEN and TENANT_TOKEN.

sha256() { printf %s "$1" | sha256sum | cut -d' ' -f1; }

hsevd_sim_and_tokens() {
  local sim_dir=$1 admin_token=$2 tenant_token=$3
  cat <<TOML
[firmware]
simulated_dir = "$sim_dir"
[[tokens]]
name = "ops"
role = "admin"
sha256 = "$(sha256 "$admin_token")"
[[tokens]]
name = "alice"
role = "tenant"
sha256 = "$(sha256 "$tenant_token")"
TOML
}
