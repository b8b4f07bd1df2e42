#!/usr/bin/env bash
# Checks of what goes onto the Pis, short of booting them (tests/deploy/enroll.py
# does that): the Ansible code linted, the systemd units verified and rated
# by systemd itself, the ARM64 build and its .deb inspected, the amd64
# package built as the Pi's is (without the developer commands), linted and
# its node's memory measured.
#
#     tests/deploy/check.sh      # uses sudo for one private mount unless run as root
#
# scripts/test.sh runs it with the tools it installed on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "FAILED: $*" >&2; exit 1; }

echo "==> yamllint, ansible-lint (production profile), ansible-playbook --syntax-check"
yamllint --strict ansible inventory.example.yaml monitoring
ansible-lint --profile production ansible inventory.example.yaml
for book in pi-fleet remove-node upgrade; do
    ansible-playbook -i inventory.example.yaml "ansible/$book.yaml" --syntax-check
done
# The fleet CA maker of the mosquitto role, with the Python that runs
# ansible-playbook (scripts/test.sh puts its virtualenv first on PATH).
python3 tests/deploy/fleet_tls_test.py
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
grep -qx "pifleet_package_version: $version" ansible/roles/pifleet_package/defaults/main.yaml ||
    fail "pifleet_package_version in ansible/roles/pifleet_package/defaults/main.yaml is not Cargo.toml's $version"

echo "==> systemd-analyze verify and security (at most 2.5) of systemd/*.service"
# verify wants ExecStart's binary at /usr/bin/pifleet: show it there in a
# private mount namespace only, over the host's /usr/bin.
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
bindir=$(mktemp -d)
trap 'rm -rf "$bindir"' EXIT
cp target/debug/pifleet "$bindir/pifleet"
out=$($sudo unshare --mount sh -c "mount -t overlay overlay -o lowerdir=$bindir:/usr/bin /usr/bin &&
    systemd-analyze verify systemd/pifleet-node.service systemd/pifleet-coordinator.service" 2>&1) ||
    fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify warned: $out"
for unit in systemd/pifleet-node.service systemd/pifleet-coordinator.service; do
    line=$(systemd-analyze security --offline=true "$unit" 2>&1 | grep 'Overall exposure level') ||
        fail "systemd-analyze security gave no exposure level for $unit"
    echo "    $line"
    score=$(echo "$line" | sed -n 's/.*: \([0-9.]*\) .*/\1/p')
    [ -n "$score" ] || fail "no exposure level for $unit"
    awk -v s="$score" 'BEGIN { exit !(s <= 2.5) }' || fail "$unit is rated $score, above 2.5"
done

echo "==> scripts/build-arm64.sh (PROFILE=${PROFILE:-pi})"
deb=$(scripts/build-arm64.sh | tail -n1)
dir=${PROFILE:-pi}
[ "$dir" = dev ] && dir=debug
binary=target/aarch64-unknown-linux-gnu/$dir/pifleet
# (Not `tee /dev/stderr`: reopening stderr truncates a log it is redirected to.)
kind=$(file "$binary")
echo "$kind" >&2
echo "$kind" | grep -q 'ELF 64-bit LSB .*ARM aarch64' || fail "$binary is not an aarch64 ELF"
got=$(qemu-aarch64 -L /usr/aarch64-linux-gnu "$binary" --version) || fail "qemu-aarch64 $binary --version failed"
[ "$got" = "pifleet $version" ] || fail "qemu-aarch64 $binary --version printed '$got', not 'pifleet $version'"
echo "    qemu-aarch64 $binary --version: $got"
info=$(dpkg-deb --info "$deb")
echo "$info" | grep -q '^ Architecture: arm64$' || fail "$deb is not Architecture: arm64"
echo "$info" | grep -q "^ Version: $version$" || fail "$deb is not Version: $version"
contents=$(dpkg-deb --contents "$deb" | awk '{print $NF}')
for path in ./usr/bin/pifleet ./lib/systemd/system/pifleet-node.service \
    ./lib/systemd/system/pifleet-coordinator.service \
    ./usr/share/doc/pifleet/copyright ./usr/share/doc/pifleet/changelog.gz \
    ./usr/share/doc/pifleet/examples/node.toml ./usr/share/doc/pifleet/examples/coordinator.toml; do
    echo "$contents" | grep -qx "$path" || fail "$deb lacks $path"
done
# The example configurations in the package are valid.
for kind in node coordinator; do
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/share/doc/pifleet/examples/$kind.toml" > "$bindir/$kind.toml"
    target/debug/pifleet config check "$bindir/$kind.toml" >/dev/null || fail "the packaged $kind.toml does not pass pifleet config check"
done
echo "    $deb: the binary, both units and the example configs"
# Debian's own checks: no error (warnings are shown).
lint() {
    local findings
    findings=$(lintian --fail-on error --tag-display-limit 0 "$1" 2>&1) \
        || { echo "$findings" >&2; fail "lintian reports errors on $1"; }
    echo "$findings" | grep -v 'root privileges' >&2 || true
    rm -rf "$bindir/DEBIAN"
    dpkg-deb -e "$1" "$bindir/DEBIAN" && [ -s "$bindir/DEBIAN/md5sums" ] || fail "$1 has no md5sums"
    echo "    lintian: no error on $1"
}
lint "$deb"

# The Pi package's binary, built for this machine as for a Pi (profile pi,
# no default features): tests/deploy/enroll.py installs its package.
echo "==> the amd64 package: the Pi package's build, without the developer commands"
cargo build --locked --profile pi --no-default-features --bin pifleet --target-dir target/lean
lean=target/lean/pi/pifleet
for dev in up ollama-sim bench; do
    if "$lean" "$dev" --help >/dev/null 2>&1; then fail "$lean has the developer command '$dev'"; fi
done
"$lean" node --help >/dev/null && "$lean" coordinator --help >/dev/null && "$lean" status --help >/dev/null ||
    fail "$lean lacks the node, the coordinator or the client"
lint "$(scripts/package-deb.sh amd64 "$lean" | tail -n1)"
# Its node's idle RSS, as `pifleet bench node-footprint` measures it: at
# least 2 MB below the 10 MB target (docs/BENCHMARKS.md).
figures=$(target/debug/pifleet bench node-footprint --node-binary "$lean" --agents 100 --seconds 1) ||
    fail "pifleet bench node-footprint --node-binary $lean failed"
rss=$(echo "$figures" | python3 -c 'import json, sys; print(json.load(sys.stdin)["rss_idle_bytes"])')
echo "    $lean: $(stat -c %s "$lean") bytes; its node idle: $rss bytes RSS"
[ "$rss" -le 8000000 ] || fail "the package's node uses $rss bytes idle, above 8,000,000 (10 MB target less 2 MB)"
echo "==> deployment checks passed"
