# The one entry point. CI runs the same targets a person does.
#   make demo   local cluster + observer + display sink + a sample TaskRun
#   make test   fmt, clippy, unit tests, then the end-to-end suite on the local cluster
#   make test-matrix   the end-to-end suite once per pinned Tekton version
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo

.PHONY: all build fmt fmt-check lint unit e2e test test-matrix demo bench perf cluster-up cluster-down tools fuzz

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

# The end-to-end suite (hack/e2e without the fault suites, which `make test`
# and `make reliability` run) once per pinned Tekton version (the newest,
# hack/tekton-latest, and the LTS, hack/tekton-lts), each on a fresh cluster
# of its own in MATRIX_CLUSTER_DIR/<version> (its logs stay there); a cluster
# running in .cluster is neither used nor disturbed. A failing version does
# not stop the next; one summary line per version at the end, non-zero exit
# if any failed. `make test-matrix TEKTON_VERSIONS=v1.9.2` runs just one.
# `CAPTURE_FIXTURES=1` also rewrites tests/fixtures/<version>/ from the runs.
CAPTURE_FIXTURES ?= 0
TEKTON_VERSIONS ?= $(foreach d,tekton-latest tekton-lts,$(shell cd hack/$(d) && go list -m -f '{{.Version}}' github.com/tektoncd/pipeline))
MATRIX_CLUSTER_DIR ?= $(CURDIR)/.cluster/matrix

test-matrix: tools
	versions="$(strip $(TEKTON_VERSIONS))"; \
	[[ -n $$versions ]] || { echo "test-matrix: no Tekton versions (go list failed?)" >&2; exit 1; }; \
	summary=(); failed=0; \
	for v in $$versions; do \
	  echo ">> test-matrix: end-to-end suite with Tekton $$v" >&2; \
	  start=$$SECONDS; \
	  capture=; \
	  if [[ "$(CAPTURE_FIXTURES)" == 1 ]]; then \
	    capture="$(CURDIR)/tests/fixtures/$$v"; rm -rf "$$capture"; mkdir -p "$$capture"; \
	  fi; \
	  if E2E_FAULT_SUITES=0 E2E_CAPTURE_FIXTURES="$$capture" TEKTON_VERSION=$$v \
	     TSO_CLUSTER_DIR="$(MATRIX_CLUSTER_DIR)/$$v" hack/e2e; then \
	    result=passed; \
	  else \
	    result="FAILED (exit $$?)"; failed=1; \
	  fi; \
	  summary+=("test-matrix: Tekton $$v: $$result in $$((SECONDS - start))s (cluster logs: $(MATRIX_CLUSTER_DIR)/$$v/logs)"); \
	done; \
	printf '%s\n' "$${summary[@]}"; \
	exit $$failed

demo: tools
	hack/demo

bench: tools
	$(CARGO) bench --bench decide --bench delivery

# Benchmarks on the local cluster, side by side with Tekton's own events
# (hack/perf): latency, throughput, memory, API load and CPU, plus the
# delivery engine alone (benches/delivery.rs). Writes BENCHMARKS.md and
# docs/perf/*.svg from one run. Not part of `make test`: it takes about
# 15 minutes and its figures are measurements, not pass/fail checks.
# Reuses a running cluster (it needs the audit log hack/cluster keeps),
# else brings one up and takes it down after. `make perf PERF_ARGS=--scenarios=latency`
# runs one scenario (the report then says the others were not measured).
# The memory scenario also measures the observer built with mimalloc and
# with jemalloc (Cargo.toml's features; the default build has the
# platform's malloc, glibc's here).
PERF_ARGS ?=
PERF_BUILDS := target/perf/builds
perf: tools
	mkdir -p $(PERF_BUILDS)
	$(CARGO) build --release --bin tekton-step-observer -p tekton-step-observer --features mimalloc
	cp target/release/tekton-step-observer $(PERF_BUILDS)/mimalloc
	$(CARGO) build --release --bin tekton-step-observer -p tekton-step-observer --features jemalloc
	cp target/release/tekton-step-observer $(PERF_BUILDS)/jemalloc
	$(CARGO) build --release --bin tekton-step-observer -p tekton-step-observer
	$(CARGO) build --release -p perf
	# Built here, where crates.io is reachable; it runs inside the cluster's
	# loopback-only namespace, offline.
	$(CARGO) bench --bench delivery --no-run
	if ! hack/cluster status >/dev/null 2>&1; then trap 'hack/cluster down' EXIT; hack/cluster up; fi; \
	rm -rf target/criterion/delivery; \
	hack/cluster exec -- $(CARGO) bench --offline --bench delivery; \
	hack/cluster exec -- target/release/perf run --observer-name "glibc malloc" \
	  --glibc-build target/release/tekton-step-observer \
	  --other-build mimalloc=$(PERF_BUILDS)/mimalloc --other-build jemalloc=$(PERF_BUILDS)/jemalloc $(PERF_ARGS); \
	target/release/perf report

cluster-up: tools
	hack/cluster up

cluster-down:
	hack/cluster down

# Fuzzes the parsers of outside input (ledger annotation, sink ConfigMaps),
# FUZZ_SECONDS per target. Not part of `make test`: it needs nightly and
# libFuzzer, and its findings are open-ended. Corpora grow in fuzz/corpus/
# from the committed fuzz/seeds/, crashes land in fuzz/artifacts/ (both
# git-ignored).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := ledger_annotation sink_configmaps
FUZZ_CARGO ?= cargo +nightly

fuzz:
	@rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
	@$(FUZZ_CARGO) fuzz --version >/dev/null 2>&1 || $(FUZZ_CARGO) install cargo-fuzz --locked
	$(FUZZ_CARGO) fuzz build
	for target in $(FUZZ_TARGETS); do \
	  corpus="$(CURDIR)/fuzz/corpus/$$target"; seeds="$(CURDIR)/fuzz/seeds/$$target"; \
	  mkdir -p "$$corpus"; [[ -d "$$seeds" ]] || seeds=; \
	  $(FUZZ_CARGO) fuzz run "$$target" "$$corpus" $$seeds -- \
	    -max_total_time=$(FUZZ_SECONDS) -dict="$(CURDIR)/fuzz/dicts/$$target.dict"; \
	done

# The fault suites (tests/faults_*.rs: a steady workload on the local cluster
# while the sink or the cluster misbehaves), one suite and one case at a time
# so their measurements don't disturb each other; each suite records its
# figures in RELIABILITY_DIR/<suite>/. Then hack/reliability-report renders
# RELIABILITY.md from them, also when a case failed (its failed checks show).
# Brings the cluster up if needed and then down again, as e2e does; a running
# cluster is reused. faults_sink takes about 5 minutes.
# `make reliability FAULT_SUITES=faults_sink` runs one suite; the report keeps
# the other suites' figures from earlier runs (each with its date).
RELIABILITY_DIR ?= $(CURDIR)/target/reliability
FAULT_SUITES ?= $(patsubst tests/%.rs,%,$(wildcard tests/faults_*.rs))
RELIABILITY_TEST_THREADS ?= 1

.PHONY: reliability
reliability: tools
	@command -v jq >/dev/null || { echo "make reliability needs jq: apt-get install -y jq" >&2; exit 1; }
	$(CARGO) build --bin tekton-step-observer
	$(CARGO) test --features e2e $(addprefix --test ,$(FAULT_SUITES)) --no-run
	if ! hack/cluster status >/dev/null 2>&1; then trap 'hack/cluster down' EXIT; hack/cluster up; fi; \
	status=0; \
	for suite in $(FAULT_SUITES); do \
	  rm -rf "$(RELIABILITY_DIR)/$$suite" && mkdir -p "$(RELIABILITY_DIR)/$$suite"; \
	  RELIABILITY_DIR="$(RELIABILITY_DIR)/$$suite" hack/cluster exec -- \
	    $(CARGO) test --offline --features e2e --test "$$suite" -- \
	    --test-threads $(RELIABILITY_TEST_THREADS) --skip disruptive:: || status=$$?; \
	done; \
	for suite in $(filter faults_cluster,$(FAULT_SUITES)); do \
	  RELIABILITY_DIR="$(RELIABILITY_DIR)/$$suite" hack/cluster exec -- \
	    $(CARGO) test --offline --features e2e --test "$$suite" -- \
	    --test-threads 1 disruptive:: || status=$$?; \
	done; \
	hack/reliability-report "$(RELIABILITY_DIR)" "$(CURDIR)/RELIABILITY.md"; \
	exit $$status
