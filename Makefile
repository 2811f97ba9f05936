# The two set-up commands of the README:
#   make run   - install what is missing (Python venv, default model, text games), build, and run the main job
#                (Reflection on every spec, then a short ETPO training run on Balance Scale)
#   make test  - install what is missing, build, and run every test (Rust, then the Python
#                bindings' pytest suite, which needs the `etpo` binary cargo test builds)
# Both use cargo's dev profile (dependencies fully optimised, see Cargo.toml), so the build is shared.

CARGO ?= cargo
STEPS ?= 6
RUN_ARGS ?= --algo reflection --steps $(STEPS) --seeds 0,1
# The main job's short ETPO run (about 15 minutes on 2 cores): it prints the mean reward and
# runnable rate over the first and the last quarter of its steps. ETPO_STEPS=0 skips it.
ETPO_STEPS ?= 64
ETPO_ARGS ?= --algo etpo --steps $(ETPO_STEPS) --seeds 0 --update-every 16 --set replay_sample=16 --set q_epochs=2 --set policy_epochs=1

.PHONY: run test setup build pytest lint

setup:
	scripts/setup.sh python bf16-if-fast model games

build: setup
	$(CARGO) build --bin etpo

run: build
	$(CARGO) run --quiet --bin etpo -- check envs/
	$(CARGO) run --quiet --bin etpo -- run envs/ $(RUN_ARGS)
	@if [ "$(ETPO_STEPS)" != 0 ]; then $(CARGO) run --quiet --bin etpo -- run envs/balance_scale.yaml $(ETPO_ARGS); fi

# Every suite runs even if one fails (the games' rules are their own cargo workspace, games/);
# the target fails if any does. The lint comes first: it is quick and shares the build.
test: setup
	scripts/setup.sh bf16
	status=0; \
	$(MAKE) --no-print-directory lint || status=1; \
	$(CARGO) test --workspace --no-fail-fast || status=1; \
	$(CARGO) test --manifest-path games/Cargo.toml --workspace --target-dir games/target || status=1; \
	$(MAKE) --no-print-directory pytest || status=1; \
	exit $$status

# Formatting (rustfmt.toml) and clippy with warnings as errors, over the workspace and games/.
lint:
	scripts/setup.sh lint
	$(CARGO) fmt --all --check
	$(CARGO) fmt --all --check --manifest-path games/Cargo.toml
	$(CARGO) clippy --workspace --all-targets --quiet -- -D warnings
	$(CARGO) clippy --manifest-path games/Cargo.toml --workspace --all-targets --target-dir games/target --quiet -- -D warnings

# The Python bindings' tests (python/tests). They compare with the `etpo` binary that cargo test
# builds, and import the module from the sources (built by cargo, sharing cargo test's build).
pytest:
	scripts/setup.sh pybind-dev
	PYTHONPATH=python .venv/bin/python -m pytest python/tests
