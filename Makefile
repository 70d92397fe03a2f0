# summon: the README's commands. Each target installs what it needs first.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup image-arm64 demo demo-per-url test test-fast bench loadtest lint fuzz clean

# SETUP_ARGS: `make test` sets it (below) for its own run of this target
setup:
	bash scripts/setup.sh $(SETUP_ARGS)

# the arm64 microVM of the demo image (and x86_64's): scripts/setup-arm64.sh enables Debian's
# arm64 packages for apt (nothing arm64 is installed: the kernel and busybox are unpacked from
# their .debs) and installs qemu-system-arm to run them. `make test` does the same (its arm64
# tests boot one); `make demo` never needs it.
IMAGE ?= decks
image-arm64: setup
	bash scripts/setup-arm64.sh
	$(VENV)/bin/summon images build $(IMAGE) --arch all

demo: setup
	bash scripts/demo.sh

demo-per-url: setup
	bash scripts/demo-per-url.sh

lint: setup
	$(VENV)/bin/ruff check proxy tests loadtests
	$(VENV)/bin/mypy proxy

# --arm64: tests/e2e/test_vm_arm64.py needs qemu-system-aarch64 and apt's arm64 lists (a
# target-specific variable, so `setup`, run once for test and lint, gets it)
test: SETUP_ARGS = --arm64
test: setup lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) loadtests/bench.py $(if $(ONLY),--only $(ONLY))

# a few minutes of hypothesis (deep profile) and, where atheris installs, coverage-guided fuzzing;
# `make test` runs the same properties with small example counts
fuzz: setup
	SUMMON_FUZZ=deep $(PY) -m pytest -q tests/integration/test_fuzz.py
	@if $(PY) -c "import atheris" 2>/dev/null; then \
	  for t in head parser config; do $(PY) tests/fuzz_targets.py $$t -max_total_time=60 -artifact_prefix=fuzz-crash- || exit 1; done; \
	else echo "atheris not installed: coverage-guided run skipped"; fi

# Locust spike: BACKEND=process|libvirt, PROFILE=spike|quick|tiny|libvirt,
# PROXY=http://127.0.0.1:8080 ADMIN=http://127.0.0.1:8081 to load a running proxy (make demo)
BACKEND ?= process
loadtest: setup
	$(if $(filter libvirt,$(BACKEND)),$(VENV)/bin/summon images build decks)
	$(PY) loadtests/spike.py --backend $(BACKEND) $(if $(PROFILE),--profile $(PROFILE)) $(if $(PROXY),--proxy $(PROXY)) $(if $(ADMIN),--admin $(ADMIN)) $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
