#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with the Rust toolchain:
# installs what the tests need, then checks formatting and lints, runs every
# unit and integration test (with real Mosquitto, Prometheus and promtool),
# checks what goes onto the Pis (Ansible lint,
# systemd units, the ARM64 build and .deb) and enrolls a fleet of four
# systemd-nspawn machines with the playbook.
#
#     scripts/test.sh             # everything (needs root, or sudo for apt)
#     scripts/test.sh --no-e2e    # all but booting the machines (~3 min less)
#     scripts/test.sh --quick     # Rust only: fmt, clippy, unit and integration tests
#
# .ci/run calls exactly `scripts/test.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
    "") ;;
    --no-e2e) mode=no-e2e ;;
    --quick) mode=quick ;;
    *) echo "usage: $0 [--no-e2e | --quick]" >&2; exit 64 ;;
esac

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
need() { dpkg -s "$1" >/dev/null 2>&1 || missing+=("$1"); }
need mosquitto
need mosquitto-clients
# Monitoring tests: promtool and a Prometheus server, Jinja2 for Home
# Assistant's templates.
need prometheus
need python3-jinja2
if [ "$mode" != quick ]; then
    for pkg in systemd-container debootstrap qemu-user file openssh-client python3-venv; do need "$pkg"; done
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    echo "==> adding rustfmt and clippy to the toolchain"
    rustup component add rustfmt clippy
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo test (benchmarks: cargo bench, see docs/BENCHMARKS.md)"
cargo test --locked --lib --bins --tests
[ "$mode" = quick ] && { echo "==> all tests passed (--quick)"; exit 0; }

# Ansible and its linters, pinned, in a virtualenv kept between runs.
venv=${PIFLEET_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pifleet/venv}
stamp="$venv/.requirements.sha256"
want=$(sha256sum tests/deploy/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> installing tests/deploy/requirements.txt into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r tests/deploy/requirements.txt
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"

cargo build --locked --bin pifleet
tests/deploy/check.sh
if [ "$mode" = full ]; then
    echo "==> tests/deploy/enroll.py: enroll four systemd-nspawn machines with ansible/pi-fleet.yaml"
    scripts/package-deb.sh amd64 target/debug/pifleet >/dev/null
    $sudo env PATH="$PATH" tests/deploy/enroll.py
fi
echo "==> all tests passed"
