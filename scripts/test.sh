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
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
