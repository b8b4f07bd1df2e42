#!/usr/bin/env bash
# Builds pifleet for 64-bit Raspberry Pi OS / Ubuntu (aarch64) with Debian's
# own cross toolchain, for hosts without Docker (where `cross` cannot run),
# and packages it as target/deb/pifleet_<version>_arm64.deb.
#
#     scripts/build-arm64.sh            # the Pi package's build (what goes on a Pi)
#     PROFILE=dev scripts/build-arm64.sh
#     FEATURES=dev scripts/build-arm64.sh   # with pifleet up, ollama-sim and bench
#
# The Pi package is built with cargo profile `pi` (release, optimised for
# size) and without the developer build's feature `dev`: the node, the
# coordinator and the client only (docs/BENCHMARKS.md, "Node footprint").
#
# Installs what it needs with apt (arm64 as a foreign architecture, Debian's
# rustc with the arm64 standard library, the aarch64 gcc for the bundled
# SQLite). Output: target/aarch64-unknown-linux-gnu/<profile>/pifleet.
#
# 32-bit Pi OS (armv7-unknown-linux-gnueabihf): build it with `cross` (see
# Cross.toml and the README). Debian's route does not reach it: bookworm's
# armhf standard library for rustc-web is 1.85 (checked 2026-11-28; the
# 1.96 update exists for amd64 and arm64 only), older than the compiler
# here and than pifleet's rust-version 1.95.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
profile=${PROFILE:-pi}
features=()
[ -n "${FEATURES:-}" ] && features=(--features "$FEATURES")
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

need=()
dpkg --print-foreign-architectures | grep -qx arm64 || $sudo dpkg --add-architecture arm64
[ -x /usr/bin/rustc ] || need+=(rustc-web)
dpkg -s libstd-rust-web-dev:arm64 >/dev/null 2>&1 || need+=(libstd-rust-web-dev:arm64)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}" >&2
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# Debian's rustc (not rustup's) has the arm64 standard library; cargo is
# still rustup's. A separate target dir keeps its artifacts apart from the
# host toolchain's. Only this build sees these variables.
cross_target_dir=${PIFLEET_CROSS_TARGET_DIR:-target/cross-debian}
echo "==> cargo build --profile $profile --target $target ($(/usr/bin/rustc --version))" >&2
env RUSTC=/usr/bin/rustc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    CARGO_TARGET_DIR="$cross_target_dir" \
    cargo build --locked --profile "$profile" --target "$target" --bin pifleet \
        --no-default-features "${features[@]}"

dir=$profile
[ "$profile" = dev ] && dir=debug
binary="$cross_target_dir/$target/$dir/pifleet"
mkdir -p "target/$target/$dir"
cp "$binary" "target/$target/$dir/pifleet"
echo "==> built target/$target/$dir/pifleet" >&2
scripts/package-deb.sh arm64 "target/$target/$dir/pifleet"
