# The two commands, on a fresh clone with Python 3.11+ (and make):
#   make run    sets up .venv, then runs the main job: python ppo.py on the offline default task
#   make test   sets up .venv with the test tools too, then runs the whole suite: python -m pytest tests -q
# Set-up happens once (a second run goes straight to the command) and again only when a lock file changes.
# It installs, with pip, exactly the versions pinned in requirements.lock (and requirements-test.lock). The locks list
# every package, so they install with --no-deps: nothing else is resolved or added. `make lock` writes them anew
# from pyproject.toml's ranges. Extra flags: make run ARGS="--seed 2", make test ARGS="-x tests/test_cli.py".

PYTHON ?= python3
VENV = .venv
PIP = $(VENV)/bin/pip
TORCH = $(shell grep '^torch==' requirements.lock)

# torch: where nvidia-smi lists a GPU, PyPI's build (on Linux the CUDA build, which brings ~3 GB of CUDA libraries).
# Elsewhere the CPU build (~200 MB) from PyTorch's CPU index; its other dependencies are in the lock.
ifeq ($(shell nvidia-smi -L 2>/dev/null | grep '^GPU'),)
TORCH_INSTALL = $(PIP) install --no-deps --index-url https://download.pytorch.org/whl/cpu $(TORCH)
else
TORCH_INSTALL = $(PIP) install $(TORCH)
endif

.PHONY: run test lock

run: $(VENV)/.run
	$(VENV)/bin/python ppo.py $(ARGS)

test: $(VENV)/.test
	$(VENV)/bin/python -m pytest tests -q $(ARGS)

$(VENV)/.run: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(TORCH_INSTALL)
	$(PIP) install --no-deps -r requirements.lock
	touch $@

$(VENV)/.test: $(VENV)/.run requirements-test.lock
	$(PIP) install --no-deps -r requirements-test.lock
	touch $@

# The newest versions that pyproject.toml's ranges allow (torch stays at the lock's, or make lock TORCH=torch==X),
# resolved by pip in a scratch venv and frozen. The CUDA build's own libraries (nvidia-*, triton, cuda-*) are left out:
# torch's install brings them where they are wanted.
FREEZE = $(PIP) freeze --all --exclude pip | sed -E 's/^(torch==[^+]*)\+.*/\1/' | grep -vE '^(nvidia-|triton=|cuda-)'
lock: VENV = .venv-lock
lock:
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(PIP) install "pip>=25.1"  # pip install --group reads pyproject.toml's dependency groups
	$(TORCH_INSTALL)
	$(PIP) install -r requirements.txt  # the same list as pyproject.toml's dependencies
	$(PIP) install --no-deps --group offline
	$(FREEZE) > requirements.lock
	$(PIP) install -c requirements.lock --group test
	$(PIP) install --no-deps --group test-no-deps
	$(FREEZE) | grep -vxF -f requirements.lock > requirements-test.lock
	rm -rf $(VENV)
