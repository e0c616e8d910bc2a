# Sluice: two commands on a fresh machine.
#   make run   — install what is missing, build release, run the quickstart pipeline
#   make test  — install what is missing, run every test (one debug build)
# Other targets: deps, build, lint, bench, clean.

SHELL := /bin/bash
CARGO ?= cargo
# System packages: mold links the big binaries in seconds; clang and libclang-dev build
# RocksDB (C++) and its bindings; pkg-config and a C toolchain
# build the C parts of compression crates.
APT_PACKAGES := mold pkg-config build-essential clang libclang-dev
QUICKSTART := pipelines/quickstart.yaml

.PHONY: run test deps build lint bench clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust from https://rustup.rs"; exit 1; }

build: deps
	$(CARGO) build --release --bin sluice

OUT_DIR ?= out/quickstart
export OUT_DIR

run: build
	rm -rf $(OUT_DIR)
	./target/release/sluice run $(QUICKSTART)
	@echo "output: $(OUT_DIR)/ — $$(ls $(OUT_DIR) | wc -l) JSON lines file(s), $$(cat $(OUT_DIR)/*.jsonl | wc -l) rows; try: head -3 $(OUT_DIR)/part-00000.jsonl"

test: deps
	$(CARGO) test --workspace --all-targets --locked

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

bench: deps
	$(CARGO) bench --bench pipeline

clean:
	$(CARGO) clean
	rm -rf out
