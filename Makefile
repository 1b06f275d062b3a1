# Task runner: these recipes are what CI runs (.ci/run calls `make test`, then `make e2e`).
.PHONY: run test e2e lint fmt unit crds conformance fuzz

## Run the gateway on the in-process broker (no set-up needed).
run:
	cargo run --release -p wsgate

## Everything CI checks: installs what is missing, then format, lints, all tests, chart checks.
test:
	scripts/test

## End to end: the operator, CRD and chart on a real control plane (etcd, kube-apiserver,
## kube-controller-manager, kube-scheduler, kwok nodes), and real Prometheus on real gateways.
e2e:
	scripts/e2e

## WebSocket conformance: the Autobahn|Testsuite fuzzing client against the gateway's own
## WebSocket layer (release build; `make test` runs the same cases on the debug build).
conformance:
	scripts/autobahn

## Fuzz the parsers of untrusted input with libFuzzer, 60 s per target (docs/fuzzing.md; CI runs
## the same checks only on a bounded number of mutations, in `cargo test`).
fuzz:
	scripts/fuzz

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test --workspace

fmt:
	cargo fmt --all
