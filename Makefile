# The two set-up commands of the README:
#   make run   - install what is missing (Python venv, default model), build, and run the main job
#   make test  - install what is missing, build, and run every test
# Both use cargo's dev profile (dependencies fully optimised, see Cargo.toml), so the build is shared.

CARGO ?= cargo
STEPS ?= 6
RUN_ARGS ?= --algo reflection --steps $(STEPS) --seeds 0,1

.PHONY: run test setup build

setup:
	scripts/setup.sh python model

build: setup
	$(CARGO) build --bin etpo

run: build
	$(CARGO) run --quiet --bin etpo -- check envs/
	$(CARGO) run --quiet --bin etpo -- run envs/ $(RUN_ARGS)

test: setup
	$(CARGO) test --workspace --no-fail-fast
