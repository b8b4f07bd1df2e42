#!/usr/bin/env bash
# Packages a built pifleet binary as a Debian package with dpkg-deb:
#
#     scripts/package-deb.sh ARCH BINARY     # e.g. arm64 target/aarch64-unknown-linux-gnu/release/pifleet
#
# Writes target/deb/pifleet_<version>_<ARCH>.deb holding /usr/bin/pifleet,
# both systemd units (installed, not enabled: a unit needs its
# /etc/pifleet/*.toml first) and commented example configurations under
# /usr/share/doc/pifleet/examples. `apt install ./pifleet_*.deb` installs it.
# The example configurations come from this checkout's `pifleet config
# default` (built for the host), so they always match the code.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 2 ]; then
    echo "usage: $0 ARCH BINARY   (ARCH as dpkg names it: arm64, armhf, amd64)" >&2
    exit 64
fi
arch=$1
binary=$2
[ -x "$binary" ] || { echo "$0: $binary is not an executable file" >&2; exit 66; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
description=$(sed -n 's/^description = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

chmod 0755 "$root"
install -D -m 0755 "$binary" "$root/usr/bin/pifleet"
# Debug builds carry hundreds of MB of debug information: a Pi needs none.
case $arch in
    arm64) tools=aarch64-linux-gnu- ;;
    armhf) tools=arm-linux-gnueabihf- ;;
    *) tools="" ;;
esac
strip=${tools}strip
if command -v "$strip" >/dev/null; then
    "$strip" --strip-debug "$root/usr/bin/pifleet"
fi
for unit in pifleet-node pifleet-coordinator; do
    install -D -m 0644 "systemd/$unit.service" "$root/lib/systemd/system/$unit.service"
done
doc="$root/usr/share/doc/pifleet"
install -D -m 0644 README.md "$doc/README.md"
mkdir -p "$doc/examples"
for kind in node coordinator; do
    cargo run --quiet --locked --bin pifleet -- config default "$kind" > "$doc/examples/$kind.toml"
done

# The newest glibc symbol version the binary needs is the libc6 it depends on.
glibc=$("${tools}objdump" -T "$root/usr/bin/pifleet" | { grep -o 'GLIBC_[0-9][0-9.]*' || true; } |
    sed 's/GLIBC_//' | sort -uV | tail -n1)
[ -n "$glibc" ] || { echo "$0: cannot tell which glibc $binary needs" >&2; exit 1; }

mkdir -p "$root/DEBIAN"
installed_kib=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: pifleet
Version: $version
Architecture: $arch
Maintainer: pifleet developers <pifleet@localhost>
Section: net
Priority: optional
Depends: libc6 (>= $glibc)
Recommends: mosquitto-clients
Installed-Size: $installed_kib
Description: $description
 A node daemon per Raspberry Pi announces its capacity over MQTT and runs
 Ollama-backed agents; a coordinator places agents, moves them when a node
 dies or is drained, and routes chat turns and jobs. Units:
 pifleet-node.service, pifleet-coordinator.service (configure
 /etc/pifleet/*.toml, then enable one).
CONTROL
# Units are installed, not enabled or started: Ansible (or the admin) writes
# the configuration first. On upgrade, running daemons restart on the new
# binary; on removal they stop.
cat > "$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ "$1" = configure ] && [ -n "$2" ]; then
        systemctl try-restart pifleet-node.service pifleet-coordinator.service || true
    fi
fi
SCRIPT
cat > "$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop pifleet-node.service pifleet-coordinator.service || true
fi
SCRIPT
cat > "$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
SCRIPT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p target/deb
out="target/deb/pifleet_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "==> $out" >&2
echo "$out"
