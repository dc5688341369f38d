# fsdp-train: `make demo` trains the tiny model on the bundled sample; `make test` runs the test suite.
# `make bench` times fsdp_train.py against the HF Trainer (BENCH_ARGS="--model medium --repeats 1" for more).
# All create the virtualenv first if needed. Re-running `make demo` resumes the run or reports it complete.
# The virtualenv gets exactly the versions pinned in requirements.lock (`make lock` refreshes it, see below).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only hosts install this torch before requirements.txt, so pip never pulls a multi-GB CUDA build.
# Elsewhere: make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
# It must agree with the torch pin in requirements.lock (`make lock` writes the lock from it).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# pip constraints file: every package pip installs into $(VENV) is held to the version pinned there.
LOCK := requirements.lock
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
NPROC ?= $(if $(HAS_GPU),$(shell nvidia-smi -L | wc -l),2)
DATA := outputs/demo-data
CORPUS := $(shell find data -type f)

.PHONY: venv demo test test-fast lint format tb clean-demo bench lock

# torch goes in first without its dependencies (they come with the next line, held to the lock like the rest).
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip -c $(LOCK)
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q --no-deps $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(PY) -m pip install -q -r requirements-dev.txt -c $(LOCK)
	touch $@

$(LOCK):
	@echo "error: $(LOCK) is missing; make venv installs exactly the versions pinned there." \
	    "Restore it (git checkout -- $(LOCK)) or write a new one with 'make lock'." >&2; exit 1

# Refresh requirements.lock when you want newer versions or changed a range in requirements*.txt. It resolves the
# ranges afresh in a throwaway venv (never from $(VENV), which may hold leftovers): $(TORCH_SPEC) first, then
# requirements-bench.txt (runtime + dev + bench), and pins everything pip installed there (pip freeze --all; torch
# without its +cpu label, so a CUDA build of the same version satisfies the pin too). Then run `make venv test`
# (and `make demo`, `make bench`) on the new lock, and commit it only after the suite passed with those versions;
# if it fails, `git checkout -- $(LOCK)` and `make venv` bring the tested versions back.
# `make lock KEEP=1` only adds what requirements*.txt gained: every version already pinned is held (pip -c $(LOCK)).
lock:
	@set -euo pipefail; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; py="$$tmp/venv/bin/python"; \
	$$py -m pip install -q --upgrade pip $(if $(KEEP),-c $(LOCK)); \
	$$py -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	$$py -m pip install -q -r requirements-bench.txt $(if $(KEEP),-c $(LOCK)); \
	{ echo "# Exact versions for make venv / demo / test / bench and CI, used as a pip constraints file:"; \
	  echo "#   pip install -r requirements-dev.txt -c $(LOCK)   (requirements.txt keeps the ranges)"; \
	  echo "# Written by 'make lock' on $$(date -u +%F) with Python $$($$py -c 'import platform as p; \
	      print(p.python_version(), p.system(), p.machine())'): a throwaway venv, $(TORCH_SPEC) first, then"; \
	  echo "# pip install -r requirements-bench.txt$(if $(KEEP), -c <the previous lock>), then pip freeze --all (torch without its"; \
	  echo "# local +cpu label)."; \
	  echo "# Refresh: make lock && make venv test; commit the new lock only after the suite passed with it."; \
	  echo "# Do not edit by hand."; \
	  $$py -m pip freeze --all | sed -E 's/^(torch==[^+]+)\+.*$$/\1/'; } > $(LOCK).tmp; \
	mv $(LOCK).tmp $(LOCK); \
	echo "wrote $(LOCK): $$(grep -c '==' $(LOCK)) pins; now run: make venv test"

$(DATA)/splits: $(CORPUS) organize_data.py | $(VENV)/.installed
	$(PY) organize_data.py --src_dir data --dst_root $@ --num_dirs 4 --overwrite
$(DATA)/dataset: $(DATA)/splits data_to_hf.py
	$(PY) data_to_hf.py --data_folder $< --save_dir $@ --num_proc 2 --overwrite
$(DATA)/tiny-llama: $(CORPUS) model_download.py | $(VENV)/.installed
	$(PY) model_download.py --tiny $@ --corpus data --overwrite

demo: $(DATA)/dataset $(DATA)/tiny-llama
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) fsdp_train.py -e demo \
	    -d $(DATA)/dataset -m $(DATA)/tiny-llama -s 128 -b 4 --lr 1e-3 --warmup-steps 5 \
	    --num-epochs 3 --log-freq 10 --ckpt-freq 50 --val-split 0.05 --eval-freq 50
	$(PY) examples/generate.py outputs/demo/hf "The lighthouse keeper" --max-new-tokens 30
	@echo "Checkpoints: outputs/demo/checkpoints  Metrics: outputs/demo/metrics.jsonl  Hugging Face model: outputs/demo/hf"
	@echo "(run 'make demo' again: it resumes an interrupted run, or reports it complete)"

# Two pytest-xdist workers: the suite's torchrun jobs leave about a third of 2 cores idle (start-up, waits), and a
# second worker fills it (12.6-12.9 -> 9.3-10.6 min on an idle 2-core machine). A run that several tests share is
# built once, by the first worker that needs it (@shared in tests/conftest.py). TEST_WORKERS=0 runs everything in
# this one process, in order.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

# The edit loop: pure functions, in-process checks and one short 2-rank run (tests/conftest.py says which are slow).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow or smoke" $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

# The benchmark's extra packages (accelerate, for the Trainer) go into the same venv once, also held to the lock.
$(VENV)/.bench-installed: requirements-bench.txt $(LOCK) $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-bench.txt -c $(LOCK)
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) bench/bench_train.py $(BENCH_ARGS)

tb: $(VENV)/.installed
	$(VENV)/bin/tensorboard --logdir outputs

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean-demo:
	rm -rf outputs/demo outputs/demo-data
