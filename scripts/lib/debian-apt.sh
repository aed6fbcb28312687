# Sourced, not run: a private apt configuration over the system's own Debian
# mirror, for the suites bookworm, bookworm-updates, bookworm-security and
# bookworm-backports. The system's apt sources are read, never edited.
#
# `private_apt_init DIR` sets `private_apt_options` (an array of apt-get -o
# options for a configuration kept under DIR); `private_apt_update` writes
# DIR/sources.list and refreshes the package index there. Errors go to
# stderr and return non-zero.

private_apt_mirror() {
  local mirror
  mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || {
    echo "no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list" >&2
    return 1
  }
  printf '%s\n' "${mirror%/}"
}

private_apt_security_mirror() {
  awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true
}

private_apt_init() {
  private_apt_dir=$1
  private_apt_options=(-o "Dir::Etc::SourceList=$private_apt_dir/sources.list"
    -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$private_apt_dir/lists"
    -o "Dir::Cache=$private_apt_dir/cache")
}

private_apt_update() {
  local mirror security
  mirror=$(private_apt_mirror) || return 1
  security=$(private_apt_security_mirror)
  mkdir -p "$private_apt_dir/lists/partial" "$private_apt_dir/cache/archives/partial"
  {
    echo "deb $mirror bookworm main"
    echo "deb $mirror bookworm-updates main"
    echo "deb $mirror bookworm-backports main"
    if [ -n "$security" ]; then echo "deb $security bookworm-security main"; fi
  } >"$private_apt_dir/sources.list.partial"
  mv "$private_apt_dir/sources.list.partial" "$private_apt_dir/sources.list"
  apt-get "${private_apt_options[@]}" -qq update
}
