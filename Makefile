# fsdp-train: `make demo` trains the tiny model on the bundled sample; `make test` runs the test suite.
# `make bench` times fsdp_train.py against the HF Trainer (BENCH_ARGS="--model medium --repeats 1" for more).
# All create the virtualenv first if needed. Re-running `make demo` resumes the run or reports it complete.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only hosts install this torch before requirements.txt, so pip never pulls a multi-GB CUDA build.
# Elsewhere: make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
NPROC ?= $(if $(HAS_GPU),$(shell nvidia-smi -L | wc -l),2)
DATA := outputs/demo-data
CORPUS := $(shell find data -type f)

.PHONY: venv demo test lint format tb clean-demo bench

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

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

test: $(VENV)/.installed
	$(PY) -m pytest

# The benchmark's extra packages (accelerate, for the Trainer) go into the same venv once.
$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-bench.txt
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
