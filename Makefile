# Task runner: these recipes are what CI runs (.ci/run calls `make test`).
.PHONY: run test lint fmt unit crds

## Run the gateway on the in-process broker (no set-up needed).
run:
	cargo run --release -p wsgate

## Everything CI checks: installs what is missing, then format, lints, all tests, chart checks.
test:
	scripts/test

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test --workspace

fmt:
	cargo fmt --all
