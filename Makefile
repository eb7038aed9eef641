# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Both create .venv in the repo root on first use and install everything into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this kind of machine; on a GPU machine run
# `make TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130" test`
# or install torch into .venv yourself first (a satisfied requirement is kept).
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= outputs/demo
MODEL_DIR ?= outputs/tiny-wan

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

$(MODEL_DIR)/model_index.json: | $(VENV)/.installed
	$(VENV)/bin/fastvideo make-tiny-model --output $(MODEL_DIR)

demo: $(VENV)/.installed $(MODEL_DIR)/model_index.json
	$(PY) -m flows.bulk --dataset examples/prompts.jsonl --output $(DEMO_DIR) \
		--model-path $(MODEL_DIR) --height 64 --width 64 --num-frames 9 \
		--num-inference-steps 10 --guidance-scale 5.0

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache
