#!/usr/bin/env bash
# Runs Basalt's whole test suite: installs missing test dependencies (as root),
# builds every binary (the end-to-end tests drive the real basaltd and basalt),
# then runs all tests with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
  scripts/install-test-deps.sh
fi
cargo build --workspace --bins
# The power-cut test is a statistical net: give it more seeds than a plain
# `cargo test`, and seeds no earlier run tried (the test prints its range;
# a failure names its seed).
export BASALT_POWER_CUT_SEEDS="${BASALT_POWER_CUT_SEEDS:-150}"
export BASALT_SEED_BASE="${BASALT_SEED_BASE:-random}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
