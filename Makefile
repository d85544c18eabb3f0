# Two commands do everything on a fresh machine (see README):
#   make run    set up, build, and run the main job on MNIST
#   make test   set up (with the test services), then run every check and test
# Everything downloaded or built is cached under ~/.cache/defuse (DEFUSE_CACHE).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
ENV := . ./env.sh

.PHONY: setup setup-test build release run test lint fmt fuzz bench

setup:
	deploy/setup.sh

setup-test:
	deploy/setup.sh --test

build: setup
	$(ENV) && cargo build --workspace

release: setup
	$(ENV) && cargo build --release -p defuse

# The main job: Defuse end to end on MNIST (trains the two models first).
run: release
	$(ENV) && "$$CARGO_TARGET_DIR/release/defuse" run examples/mnist.toml

lint: setup
	$(ENV) && cargo fmt --all --check
	$(ENV) && cargo clippy --workspace --all-targets --features defuse/otlp -- -D warnings

test: setup-test lint
	$(ENV) && cargo nextest run --workspace --features defuse/otlp --no-fail-fast

fmt:
	cargo fmt --all

# Longer fuzzing of the readers and the config parser (core/tests/fuzz.rs): 20,000
# cases per target, a few minutes. Failing cases land in core/proptest-regressions/.
fuzz: setup
	$(ENV) && PROPTEST_CASES=20000 cargo nextest run -p defuse-core --test fuzz

# The benchmarks (bench/run.py; not part of `make test`). About 2.5 hours on 2 cores
# (the planted-bug rows are most of it; `python3 bench/run.py --skip planted` for less).
bench: setup
	python3 bench/run.py
