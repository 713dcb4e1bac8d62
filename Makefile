# The two commands a newcomer runs:
#   make demo   the main job: the local environment, and (as issues land) the operator,
#               a sample pipeline and workers processing orders
#   make test   everything CI checks: fmt, clippy, unit tests, integration tests
#               against a private environment that is always torn down
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE ?= $(HOME)/.cache/orderpipeline
# One target directory shared by every checkout (and CI's clone): an optimisation only.
export CARGO_TARGET_DIR ?= $(CACHE)/target
export ORDERPIPE_CACHE ?= $(CACHE)

.PHONY: demo demo-down image setup-node integration-real-node test test-faults bench bench-growth bench-pool bench-operator bench-operator-smoke lint unit integration tools release-check

demo:
	hack/demo

demo-down:
	hack/env down

test: lint unit release-check integration integration-real-node bench-operator-smoke

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	"$$(hack/build-mdbook)" build docs
	hack/check-book-links
	hack/longest-fns

# The release version agrees everywhere it is written, and every binary's
# --version names it and this checkout's commit.
release-check:
	hack/release-check

# Unit tests: pure code, no services.
unit:
	cargo test --workspace --lib --bins --locked

# Integration tests (every tests/*.rs of every crate): the contract's interop test
# (Python protobuf) and the tests against a private real environment.
integration: tools
	cargo build --workspace --locked
	hack/build-v1-worker >/dev/null
	ORDERPIPE_PYTHON="$$(hack/python-env)" hack/with-env cargo test --workspace --test '*' --locked

# The project's Pods on a real node (containerd, runc, the kubelet; hack/env up
# --real-node): the image built from ./Dockerfile, the operator installed from
# manifests/, worker Pods killed, frozen and rolled during traffic.
# A second environment for the Helm chart (its operator would be a second one
# beside the kustomize install) and the real Prometheus.
integration-real-node: tools setup-node
	cargo build --workspace --locked
	ORDERPIPE_IMAGE_ARCHIVE="$$(hack/image)" hack/with-env --real-node \
	  cargo test -p orderpipeline-e2e --test real_node --locked -- --ignored
	ORDERPIPE_IMAGE_ARCHIVE="$$(hack/image)" hack/with-env --real-node \
	  cargo test -p orderpipeline-e2e --test helm_node --locked -- --ignored

# The project's image from ./Dockerfile (buildah, no daemon, no registry); prints
# the OCI archive to import (ctr -n k8s.io images import FILE).
image: setup-node
	hack/image

# Debian's containerd, runc, CNI plugins and buildah (once; needs root).
setup-node:
	hack/setup-node

# The long fault-injection scenarios (50k orders with SIGKILLs, 10 s network cuts,
# an API server restart, ...) against their own environment. make test runs short
# versions of the same scenarios.
test-faults: tools
	hack/test-faults

# Throughput next to the raw JetStream baseline, measured in the same run.
bench: tools
	hack/bench

# What a growing stream costs the NATS server (memory per stored order, drain
# rate, restart time), next to the anchor's KV-per-order design in the same run;
# writes its block of docs/src/benchmarks.md and docs/src/bench-growth.svg.
bench-growth: tools
	hack/bench-growth

# One worker's orders/s against WORKER_POOL_SIZE (1, 10, 50, 200), next to the raw
# JetStream baseline; writes its block of docs/src/benchmarks.md and docs/src/bench-pool.svg.
bench-pool: tools
	hack/bench-pool

# The operator with N = 100, 300 and 500 pipelines next to the direct cost of the
# same objects (kubectl apply + a nats.go program), measured in the same run;
# writes its block of docs/src/benchmarks.md and docs/src/bench-operator.svg.
bench-operator: tools
	BENCH_WRITE_DOCS=1 hack/bench-operator

# make test runs the same script at N = 5 (debug build, 10 s steady window) so it
# keeps working.
bench-operator-smoke: tools
	BENCH_N=5 BENCH_CREATE_RUNS=2 BENCH_STEADY=10 BENCH_PROFILE=debug hack/bench-operator

tools:
	hack/build-tools >/dev/null
