# The two set-up commands: `make demo` and `make test`. Each creates or reuses
# .venv and installs what it needs; nothing has to be installed by hand.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The CPU build of torch; override (e.g. TORCH_SPEC=torch) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install proto clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install "$(TORCH_SPEC)"
	@# DeepSpeed builds against the torch just installed, not a fresh one.
	$(PIP) install --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -e ".[test]"
	@# Compile DeepSpeed's CPU comm op now rather than on the first service start.
	$(PY) -c "import services.engine as e; e.build_cpu_ops()"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhf demo

test: $(STAMP)
	$(PY) -m pytest -q

proto: $(STAMP)
	$(PY) proto/generate.py

clean:
	rm -rf runs .pytest_cache
