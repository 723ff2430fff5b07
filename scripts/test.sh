#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints, then all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The API-level end-to-end suites again, each server on an etcd of its own
# (--workspace keeps the features, and so the builds, of the run above).
TAPESTRY_TEST_STORE=etcd cargo test --workspace --locked --test kubectl --test controllers --test durability --test crds
