# Kybernate — two commands on a fresh Debian bookworm node (as root):
#   make demo   installs what is missing, then checkpoints and restores a live workload
#   make test   installs what is missing, then runs every check CI runs
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps build demo test lint fmt clean

## deps: install containerd, runc, CRIU 4.x (built from source), protoc and test tools (idempotent)
deps:
	@bash scripts/deps.sh

## build: release binaries of the whole workspace
build: deps
	$(CARGO) build --workspace --release

## demo: a live process checkpointed, killed and restored with its memory intact
demo: deps
	$(CARGO) build --release -p kybernate-examples
	./target/release/checkpoint-restore-process

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: lint, then every unit and end-to-end test against real CRIU, runc and containerd
test: deps lint
	bash scripts/cargo-test.sh --workspace --no-fail-fast

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
