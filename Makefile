# Kybernate — two commands on a fresh Debian bookworm node (as root):
#   make demo   installs what is missing, then checkpoints and restores a live workload
#   make test   installs what is missing, then runs every check CI runs
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps build images demo test bench lint fmt clean

## deps: install containerd, runc, CRIU 4.x (built from source), protoc and test tools (idempotent)
deps:
	@bash scripts/deps.sh

## build: release binaries of the whole workspace
build: deps
	$(CARGO) build --workspace --release

## images: OCI image archives of every component under target/images/ (`ctr images import`; docs/deploy.md)
images: deps
	bash scripts/build-images.sh

## demo: a live container checkpointed when stopped, shipped to the local store and resumed from it
demo: deps
	$(CARGO) build --release -p kybernate-examples -p kybernate-shim -p kybernate-sidecar
	./target/release/stop-and-resume

## lint: formatting, clippy (warnings are errors), and no modules importing each other in a circle
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 scripts/module-cycles.py api/src metrics-http/src operator/src checkpoint-core/src shim/src sidecar/src device-plugin/src agent/src tests/src installer/src bench/src

## test: lint, then every unit and end-to-end test against real CRIU, runc and containerd (the system's
## 1.6, then the containerd tests again against containerd 1.7 from `make deps`)
CONTAINERD_TESTS := --test shim_lifecycle --test checkpoint_on_stop --test restore_security --test cri_flow --test agent --test foreign_archive
test: deps lint
	bash scripts/cargo-test.sh --workspace --no-fail-fast
	KYBERNATE_TEST_CONTAINERD_BIN=/opt/kybernate/containerd-1.7/usr/bin \
	  bash scripts/cargo-test.sh -p kybernate-tests --no-fail-fast $(CONTAINERD_TESTS)

## bench: checkpoint and restore against the floor, raw CRIU, the stock runc shim and Podman, then the
## sidecar against tar, as ratios in one run (BENCH_FLAGS="--with-8g" adds 8 GiB; see docs/benchmarks.md)
BENCH_FLAGS ?=
bench: deps
	$(CARGO) build --release -p kybernate-shim -p kybernate-sidecar -p kybernate-bench
	@[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core
	./target/release/kybernate-bench --shim $(CURDIR)/target/release/containerd-shim-kybernate-v1 \
	  --sidecar $(CURDIR)/target/release/kybernate-sidecar --out $(CURDIR)/target/bench $(BENCH_FLAGS)
	SIDECAR=$(CURDIR)/target/release/kybernate-sidecar bash sidecar/scripts/bench.sh

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
