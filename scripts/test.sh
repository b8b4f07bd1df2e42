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
#     scripts/test.sh --long      # everything, with the nemesis at 20 seeds of
#                                 # 5 minutes each (~2 h more) instead of 5 of 1
#     scripts/test.sh --ha        # everything, and two coordinators on PostgreSQL
#                                 # enrolled on four more machines (~3 min more)
#
# .ci/run calls exactly `scripts/test.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
ha=no
case "${1:-}" in
    "") ;;
    --ha) ha=yes ;;
    --no-e2e) mode=no-e2e ;;
    --quick) mode=quick ;;
    --long)
        # tests/nemesis.rs reads these (docs/RELIABILITY.md).
        export PIFLEET_NEMESIS_SEEDS=${PIFLEET_NEMESIS_SEEDS:-20}
        export PIFLEET_NEMESIS_SECS=${PIFLEET_NEMESIS_SECS:-300}
        ;;
    *) echo "usage: $0 [--no-e2e | --quick | --long | --ha]" >&2; exit 64 ;;
esac

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
need() { dpkg -s "$1" >/dev/null 2>&1 || missing+=("$1"); }
need mosquitto
need mosquitto-clients
# Streaming endpoints are read with curl -N (tests/streaming.rs).
need curl
# Clocks that disagree (tests/faults.rs, tests/nemesis.rs).
need faketime
# Monitoring tests: promtool and a Prometheus server, Jinja2 for Home
# Assistant's templates.
need prometheus
need python3-jinja2
# The coordinators' shared store (tests/util/postgres.rs starts a private
# cluster per test process; setpriv, from util-linux, runs it).
need postgresql
if [ "$mode" != quick ]; then
    for pkg in systemd-container debootstrap qemu-user file openssh-client python3-venv lintian; do need "$pkg"; done
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
echo "==> the coordinator's tests again with the store on PostgreSQL"
# In process: the store, the core and the API. As processes: chats, jobs,
# failover and restarts (tests/coordinator.rs, tests/failover.rs), except
# those that are SQLite's own: a lone coordinator paused past its lease is
# deposed on PostgreSQL (tests/takeover.rs covers that), and the
# benchmarks' tests start fleets of their own on SQLite (one reads the file).
export PIFLEET_TEST_STORE=postgres
cargo test --locked --lib coordinator::
cargo test --locked --test tests -- coordinator:: failover:: \
    --skip a_coordinator_paused_longer_than_node_lost_after \
    --skip failover::bench_
unset PIFLEET_TEST_STORE
[ "$mode" = quick ] && { echo "==> all tests passed (--quick)"; exit 0; }

# Python tools, pinned, each set in a virtualenv kept between runs:
# Ansible and its linters, and the peers' Ollama clients.
cache=${XDG_CACHE_HOME:-$HOME/.cache}/pifleet
venv_for() { # DIR REQUIREMENTS
    local stamp="$1/.requirements.sha256" want
    want=$(sha256sum "$2" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "==> installing $2 into $1"
        rm -rf "$1"
        python3 -m venv "$1"
        "$1/bin/pip" install -q -r "$2"
        echo "$want" > "$stamp"
    fi
}
venv=${PIFLEET_TOOLS_VENV:-$cache/venv}
venv_for "$venv" tests/deploy/requirements.txt
venv_for "$cache/peers-venv" tests/peers/requirements.txt
export PATH="$venv/bin:$PATH"

cargo build --locked --bin pifleet
echo "==> tests/peers/ollama_clients.py: the ollama Python client and LiteLLM against ollama-sim"
LITELLM_LOCAL_MODEL_COST_MAP=True "$cache/peers-venv/bin/python" tests/peers/ollama_clients.py target/debug/pifleet
echo "==> tests/peers/fleet_clients.py: the openai and ollama Python clients and LiteLLM against the coordinator"
LITELLM_LOCAL_MODEL_COST_MAP=True "$cache/peers-venv/bin/python" tests/peers/fleet_clients.py target/debug/pifleet
tests/deploy/check.sh
if [ "$mode" = full ]; then
    echo "==> tests/deploy/enroll.py: enroll four systemd-nspawn machines with ansible/pi-fleet.yaml"
    # The amd64 package check.sh built from target/lean/pi/pifleet.
    $sudo env PATH="$PATH" tests/deploy/enroll.py
fi
if [ "$ha" = yes ]; then
    echo "==> tests/deploy/ha_enroll.py: two coordinators on PostgreSQL, enrolled with ansible/pi-fleet.yaml"
    $sudo env PATH="$PATH" tests/deploy/ha_enroll.py
fi
echo "==> all tests passed"
