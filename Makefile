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
# The trained shapes model that ships in the repo (docs/training_demo_model.md). Any other
# Diffusers folder works; a missing one under outputs/ is made as a tiny random-weight Wan.
MODEL_DIR ?= models/shapes-demo

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

# The shapes model's own settings (64x64, 17 frames, 20 steps, CFG 5), then the scorer
# says whether each video shows the prompted colour, shape, motion and background.
demo: $(VENV)/.installed $(MODEL_DIR)/model_index.json
	$(PY) -m flows.bulk --dataset examples/prompts.jsonl --output $(DEMO_DIR) \
		--model-path $(MODEL_DIR) --height 64 --width 64 --num-frames 17 \
		--num-inference-steps 20 --guidance-scale 5.0
	$(PY) -m fastvideo.training.score_videos $(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache
