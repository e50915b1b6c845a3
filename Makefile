# Two commands do everything on a fresh machine (Python 3.10+ and make are all it needs):
#   make demo   install the core dependencies, write the digits shards, train recipes/digits.yaml on 2 CPU processes
#   make test   install the dev extra too and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev

.PHONY: setup demo test test-fast test-gpu gpu-check bench clean

# Re-installs only when pyproject.toml changes. --no-compile: pip would byte-compile every file of
# torch & co. (about a minute here); Python compiles the modules a run imports when it imports them.
$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar off --no-compile -e ".[$(EXTRAS)]"
	touch $@

# The demo needs the core dependencies only (not DeepSpeed, ONNX, SeaweedFS... of the dev
# extra): a venv that already has an extra installed has them too.
$(VENV)/.installed-core: pyproject.toml
	if [ -n "$$(find $(VENV) -maxdepth 1 -name '.installed-*' -newer pyproject.toml 2>/dev/null)" ]; then \
		touch $@; \
	else \
		test -x $(PY) || $(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install --quiet --upgrade pip; \
		$(PY) -m pip install --quiet --progress-bar off --no-compile -e . && touch $@; \
	fi

setup: $(VENV)/.installed-$(EXTRAS)

data/digits/info.json: | $(VENV)/.installed-core
	$(PY) -m launcher.shards digits --out data/digits

# The demo forces the CPU (CUDA_VISIBLE_DEVICES=) so it behaves the same on any machine.
# RUN_ARGS: recipe overrides (the tests run `make demo RUN_ARGS="train.max_steps=2 run.dir=..."`).
demo: $(VENV)/.installed-core data/digits/info.json
	CUDA_VISIBLE_DEVICES= $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
		--mixed_precision no --dynamo_backend no -m launcher recipes/digits.yaml $(RUN_ARGS)

# A whole-suite limit too (tests have their own, pyproject.toml): a process that hangs after the
# tests, at exit, fails the run instead of holding CI until its own limit (90 min). 85 min is
# several times what the suite takes on 2 cores, and still fails first.
# TEST_WORKERS: pytest-xdist workers, each taking whole test files (--dist loadfile), so a file's
# module fixtures (the Slurm cluster, shared reference runs) are built once. Much of a test's time
# is spent waiting (for ranks to start, checkpoints, Slurm) with a core idle: 2 workers fill it.
# --no-loadscope-reorder: files go out in collection order, the longest first (tests/conftest.py),
# not xdist's default of the most tests first.
TEST_WORKERS ?= 2
test: setup
	timeout -k 30 5100 $(PY) -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

# The one-command GPU check (README "GPU speed"): tests/test_gpu.py, then training images/s, MFU,
# bit-identity and loader headroom, written to $(GPU_CHECK_OUT). Without CUDA: tiny sizes on the CPU.
GPU_CHECK_OUT ?= benchmarks/results/gpu.md
gpu-check: setup
	timeout -k 10 600 $(PY) benchmarks/gpu.py --out $(GPU_CHECK_OUT)

# On a machine with CUDA GPUs: the NCCL / bf16 equivalences, printing the measured differences.
test-gpu: setup
	$(PY) -m pytest -q -ra -s -m gpu tests/test_gpu.py

bench: setup
	$(PY) benchmarks/loop_overhead.py

clean:
	rm -rf $(VENV) runs data .pytest_cache
