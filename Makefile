# cheers-pl: `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
PRESET  ?= paper
ARGS    ?=
RUNS    ?= runs
OVERLAY := $(if $(filter tiny,$(PRESET)),-c experiments/tiny.yaml,)
THREADS := $(if $(filter tiny,$(PRESET)),CHEERS_NUM_THREADS=1,)
TINY_VAE := $(RUNS)/tiny/vae
# PRESET=tiny: the demo's VAE fit (fitted once, on the demo shards) instead of random tiny weights
comma   := ,
OVERLAY += $(if $(filter tiny,$(PRESET)),--model.init_args.spec.vae "{flavor: pretrained$(comma) path: $(TINY_VAE)}",)
STAGE_DATA := $(if $(filter tiny,$(PRESET)),data/demo/manifest.json $(TINY_VAE)/config.json,)

.DEFAULT_GOAL := help
.PHONY: help setup test lint format clean bench bench-gpu bench-data stage1 stage2 stage3 stage4 tb demo sweep paper-tables faults readme-check

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-deepspeed.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation -r requirements-deepspeed.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the pinned requirements and the kit (fast when done)

test: setup ## Run the test suite (installs first)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

readme-check: setup ## Run the README's CPU blocks that take minutes, in a fresh copy (~40 min on 2 cores)
	CHEERS_NUM_THREADS=1 $(BIN)/python -m pytest -m readme -s tests/test_readme.py $(PYTEST_ARGS)

lint: setup ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

data/demo/manifest.json: | setup
	$(BIN)/cheers data demo --out data/demo

$(TINY_VAE)/config.json: data/demo/manifest.json
	CHEERS_NUM_THREADS=1 $(BIN)/python -m cheers_pl.demo_vae --shards data/demo/understanding data/demo/generation --out $(TINY_VAE)

stage1: setup $(STAGE_DATA) ## Stage I alignment (PRESET=tiny: CPU, tiny, demo shards; ARGS= passed on)
	$(THREADS) $(BIN)/cheers fit -c experiments/stage1_alignment.yaml $(OVERLAY) --trainer.default_root_dir $(RUNS)/$(PRESET)/stage1 $(ARGS)

stage2: setup $(STAGE_DATA) ## Stage II general pre-training, from stage I's last checkpoint
	$(THREADS) $(BIN)/cheers fit -c experiments/stage2_pretrain.yaml $(OVERLAY) --trainer.default_root_dir $(RUNS)/$(PRESET)/stage2 $(ARGS)

stage3: setup $(STAGE_DATA) ## Stage III refined pre-training, from stage II's last checkpoint
	$(THREADS) $(BIN)/cheers fit -c experiments/stage3_refined.yaml $(OVERLAY) --trainer.default_root_dir $(RUNS)/$(PRESET)/stage3 $(ARGS)

stage4: setup $(STAGE_DATA) ## Stage IV SFT, from stage III's last checkpoint
	$(THREADS) $(BIN)/cheers fit -c experiments/stage4_sft.yaml $(OVERLAY) --trainer.default_root_dir $(RUNS)/$(PRESET)/stage4 $(ARGS)

demo: setup ## The main job: demo shards, stage I then II tiny on CPU, logs + checkpoint + image
	$(BIN)/cheers demo $(ARGS)

sweep: setup data/demo/manifest.json ## Ablation sweep: a base stage under overlays, tiny on CPU, results table (ARGS= passed on)
	CHEERS_NUM_THREADS=1 $(BIN)/cheers sweep $(ARGS)

paper-tables: setup ## Tables 5 and 6 and Figure 5b at tiny size, 3 seeds per row (~1 h on CPU; resumable; ARGS= passed on)
	CHEERS_NUM_THREADS=1 $(BIN)/cheers paper-tables $(ARGS)

tb: setup ## TensorBoard on the run folder (RUNS=runs)
	$(BIN)/tensorboard --logdir $(RUNS)

bench-data: setup ## Data loader samples/s beside the raw decode-and-resize rate (demo shards)
	$(BIN)/python benchmarks/bench_data.py

bench: setup ## Model benchmarks: train step, sampler vs the reference, mask bytes, tokens/image; LoRA vs full stage IV
	$(BIN)/python benchmarks/bench.py
	CHEERS_NUM_THREADS=1 $(BIN)/python benchmarks/bench_lora.py

bench-gpu: setup ## GPU figures, paper size in bf16 on one GPU: step time, tokens/s, MFU, sampler s/image (ARGS=--json f)
	$(BIN)/python benchmarks/gpu_figures.py $(ARGS)

clean: ## Remove caches (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info

faults: setup ## Fault-injection cases against the real CLI (bad samples, wrong paths, two runs, kills); prints a table
	$(BIN)/python -m tests.faults $(ARGS)
