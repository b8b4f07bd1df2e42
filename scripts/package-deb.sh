#!/usr/bin/env bash
# Packages a built pifleet binary as a Debian package with dpkg-deb:
#
#     scripts/package-deb.sh ARCH BINARY     # e.g. arm64 target/aarch64-unknown-linux-gnu/release/pifleet
#
# Writes target/deb/pifleet_<version>_<ARCH>.deb holding /usr/bin/pifleet,
# both systemd units (installed, not enabled: a unit needs its
# /etc/pifleet/*.toml first) and commented example configurations under
# /usr/share/doc/pifleet/examples, with a copyright file, a changelog and
# md5sums; its maintainer scripts use deb-systemd-invoke and
# deb-systemd-helper. `apt install ./pifleet_*.deb` installs it;
# `lintian` reports no error on it (tests/deploy/check.sh).
# PIFLEET_DEB_MAINTAINER="Name <mail>" sets the Maintainer field;
# PIFLEET_DEB_VERSION the package's version (default: Cargo.toml's), e.g.
# 0.1.0+local.2 for a build of your own that upgrade.yaml should roll out.
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

version=${PIFLEET_DEB_VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)}
echo "$version" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$' ||
    { echo "$0: PIFLEET_DEB_VERSION '$version' is not a Debian upstream version (digits first; letters, digits, . + ~)" >&2; exit 64; }
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
command -v "$strip" >/dev/null || { echo "$0: $strip is missing (Debian: binutils for $arch)" >&2; exit 69; }
# Debian policy: no debug information and no symbol table in a package.
"$strip" --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/pifleet"
for unit in pifleet-node pifleet-coordinator; do
    install -D -m 0644 "systemd/$unit.service" "$root/lib/systemd/system/$unit.service"
done
doc="$root/usr/share/doc/pifleet"
install -D -m 0644 README.md "$doc/README.md"
maintainer=${PIFLEET_DEB_MAINTAINER:-pifleet developers <pifleet@example.org>}
# A reproducible date: the commit's, else SOURCE_DATE_EPOCH, else now.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
cat > "$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pifleet
Upstream-Contact: $maintainer

Files: *
Copyright: $(date -u -d "@$epoch" +%Y) the pifleet developers
License: no-license-granted
 The pifleet developers have not published pifleet under a license yet:
 until they do, all rights are reserved and this package is for the fleets
 of those who built it.
 .
 /usr/bin/pifleet links statically the Rust crates listed in the
 Cargo.lock of its source, each under its own license (mostly MIT or
 Apache-2.0; SQLite is in the public domain).
COPYRIGHT
printf 'pifleet (%s) unstable; urgency=medium\n\n  * Built from the pifleet source tree; its README.md and docs/ say what\n    changed.\n\n -- %s  %s\n' \
    "$version" "$maintainer" "$(date -u -R -d "@$epoch")" | gzip -9n > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz" "$doc/copyright"
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
Maintainer: $maintainer
Section: net
Priority: optional
Depends: libc6 (>= $glibc), init-system-helpers (>= 1.52)
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
# binary; on removal they stop; on purge systemd's record of them goes.
# As debhelper's dh_installsystemd does it, through init-system-helpers.
units="pifleet-node.service pifleet-coordinator.service"
cat > "$root/DEBIAN/postinst" <<SCRIPT
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
    if [ "\$1" = configure ] && [ -n "\$2" ]; then
        deb-systemd-invoke try-restart $units >/dev/null || true
    fi
fi
SCRIPT
cat > "$root/DEBIAN/prerm" <<SCRIPT
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "\$1" = remove ]; then
    deb-systemd-invoke stop $units >/dev/null || true
fi
SCRIPT
cat > "$root/DEBIAN/postrm" <<SCRIPT
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "\$1" = purge ] && command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper purge $units >/dev/null || true
fi
SCRIPT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort |
    xargs md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

mkdir -p target/deb
out="target/deb/pifleet_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "==> $out" >&2
echo "$out"
