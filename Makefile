# Two entry points for a fresh machine; each builds its own virtual environment in .venv.
# torch==2.13.0 is installed first: on the project's machines it is a local CPU wheel, while any
# other torch requirement would pull several GB of CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint eval reference-model clean

$(BIN)/flowcut: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# Answers a question about examples/shapes.png with the bundled reference model, keeping 64 of 576 tokens.
demo: $(BIN)/flowcut
	$(BIN)/flowcut generate --image examples/shapes.png --prompt "what colour is the square ?" --keep 64 \
		--max-new-tokens 4

# Accuracy of every method (FlowCut, its one-shot ablation, VisionZip, FastV, DivPrune, pool, random) at
# 192/128/64/32 tokens, 2000 questions (about 30 min on 2 CPU cores; the README table used --count 800).
eval: $(BIN)/flowcut
	$(BIN)/flowcut eval --output build/eval

# Retrains the bundled model from scratch (about an hour on 2 CPU cores) into build/reference-model.
reference-model: $(BIN)/flowcut
	$(BIN)/python -m flowcut.reference.train --output build/reference-model

test: $(BIN)/flowcut
	$(BIN)/python -m pytest -q

lint: $(BIN)/flowcut
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build .pytest_cache
