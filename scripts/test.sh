#!/usr/bin/env bash
# The whole test suite: formatting, lints, every crate's tests, the fuzz
# target's build. Needs only cargo; run from anywhere in the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "fuzz target builds"
# Its own workspace (libFuzzer); the same target dir reuses the main build.
cargo build --manifest-path fuzz/Cargo.toml --target-dir target --locked
