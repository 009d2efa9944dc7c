# The one entry point. CI runs the same targets a person does.
#   make demo   local cluster + observer + display sink + a sample TaskRun
#   make test   fmt, clippy, unit tests, then the end-to-end suite on the local cluster
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo

.PHONY: all build fmt fmt-check lint unit e2e test demo bench cluster-up cluster-down tools

all: build

# Rust's toolchain is pinned in rust-toolchain.toml; rustup installs it on first use.
tools:
	@hack/ensure-tools

build: tools
	$(CARGO) build --release --bin tekton-step-observer

fmt:
	$(CARGO) fmt --all

fmt-check: tools
	$(CARGO) fmt --all -- --check

lint: tools
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

unit: tools
	$(CARGO) test --workspace --lib --bins --tests --benches

# The end-to-end suite brings the cluster up itself and always takes it down.
e2e: tools
	hack/e2e

test: fmt-check lint unit e2e

demo: tools
	hack/demo

bench: tools
	$(CARGO) bench --bench decide

cluster-up: tools
	hack/cluster up

cluster-down:
	hack/cluster down
