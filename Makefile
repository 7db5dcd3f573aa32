# kalm-lightning: `make demo` and `make test` work on a fresh clone with Python 3.10+ and a package index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MURA_ROOT ?= /data/MURA
HARDWARE ?= gpu
TABLE1_DIR ?= outputs/mura/table1
# Table 1's extra row: a localizer beyond the paper's, as overrides (the localizer group is part
# of every stage's config; stage 1 ignores it): the one the localizer study names best on its
# hold-out (experiments/localizers/summary.json "best"; a test keeps the two equal). Its teacher,
# p(label) of each anchor, was chosen where every normal view has a decoy blob; on MURA the
# issue's p(abnormal) is the other candidate: BEST_VARIANT='... localizer.teacher_score=abnormal'.
BEST_VARIANT ?= localizer=navigator localizer.teacher_score=label localizer.reads=source localizer.grid=6 localizer.half=0.4
# make bench BENCH_ARGS='--device cuda --precision bf16 --channels-last --batch 64'
BENCH_ARGS ?=
STUDY_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: help install demo test test-slow docs lint format sweep study table1 bench clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# The install: uv (from PATH, or from the index into the venv: a second) unpacks in parallel, in
# about a quarter of pip's time; pip where uv cannot be had. Both leave every module compiled
# (pip does by default, uv with --compile-bytecode): where PYTHONDONTWRITEBYTECODE is set, as on
# these machines, nothing is ever cached otherwise, and each command and test process spent
# ~17 s compiling torch, Lightning and timm before it did anything (7 s with the bytecode). uv reads no pip configuration, so the
# find-links, indexes and constraints pip is configured with (pip config list: files and PIP_*)
# are handed to it, and it weighs every index as pip does (unsafe-best-match).
PIP_SOURCES = $(PYTHON) -m pip config list 2>/dev/null \
	| sed -nE "s/^[^.]*\.(find-links|index-url|extra-index-url|constraint)='(.*)'$$/\1 \2/p" \
	| while read -r key values; do for value in $$values; do printf -- '--%s %s ' "$$key" "$$value"; done; done

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if UV=$$(command -v uv || ($(BIN)/pip install --quiet uv >/dev/null 2>&1 && echo $(BIN)/uv)); then \
		echo "installing with $$UV"; \
		$$UV pip install --quiet --python $(BIN)/python --index-strategy unsafe-best-match \
			--compile-bytecode $$($(PIP_SOURCES)) -e '.[dev]'; \
	else \
		echo "installing with pip (uv is not available)"; \
		$(BIN)/pip install --quiet -e '.[dev]'; \
	fi
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with the dev extra (again when pyproject.toml changes)

demo: $(STAMP)  ## stage 1 -> stage 2 -> evaluation on synthetic data, ResNet18 on the CPU (~6 min)
	$(BIN)/python -m kalm_lightning.train experiment=demo

test: $(STAMP)  ## the quick tier: every feature once, CPU only, on every core (~5-10 min on 2 cores)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m "not slow"

test-slow: $(STAMP)  ## the slow tier: resume after kill, DDP faults, sweeps, the study, ... (~12-25 min)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m slow

docs: $(STAMP)  ## the documentation site (mkdocs-material + mkdocstrings) into build/site, warnings as errors
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

lint: $(STAMP)  ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

sweep: $(STAMP)  ## the paper's three backbones on MURA in one multirun (MURA_ROOT=/path)
	$(BIN)/python -m kalm_lightning.train -m experiment=paper data.root=$(MURA_ROOT) \
		backbone=resnet18,vgg16,inception_v4

study: $(STAMP)  ## the localizer study on synthetic data, resumable (experiments/localizers/RESULTS.md)
	$(BIN)/python -m experiments.localizers.study $(STUDY_ARGS)

table1: $(STAMP)  ## the paper's Table 1 on MURA: 3 backbones + the best variant, then RESULTS.md (MURA_ROOT=/path)
	$(BIN)/python -m kalm_lightning.train -m experiment=paper hardware=$(HARDWARE) data.root=$(MURA_ROOT) \
		evaluate.bootstrap=1000 hydra.sweep.dir=$(TABLE1_DIR)/paper backbone=resnet18,vgg16,inception_v4
	$(BIN)/python -m kalm_lightning.train -m experiment=paper hardware=$(HARDWARE) data.root=$(MURA_ROOT) \
		evaluate.bootstrap=1000 hydra.sweep.dir=$(TABLE1_DIR)/variant backbone=resnet18 $(BEST_VARIANT)
	$(BIN)/python experiments/table1/aggregate.py $(TABLE1_DIR) --out experiments/table1/RESULTS.md

bench: $(STAMP)  ## KALM against a plain timm classifier, loader against step: table + bench.json
	$(BIN)/python experiments/bench/bench.py $(BENCH_ARGS)

clean:  ## remove .venv, outputs, generated data and caches
	rm -rf $(VENV) outputs multirun data build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
