# Two entry points for a fresh machine; each builds its own virtual environment in .venv.
# torch==2.13.0 is installed first: on the project's machines it is a local CPU wheel, while any
# other torch requirement would pull several GB of CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The oldest transformers release of the verified range (flowcut.compat.OLDEST_VERIFIED; pyproject.toml's
# lower bound). `make test` runs on the newest release the range allows, `make test-oldest` on this one.
OLDEST_TRANSFORMERS := 5.21.0
OLDEST_VENV := .venv-oldest

.PHONY: demo test test-oldest lint eval reference-model clean

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

$(OLDEST_VENV)/bin/flowcut: pyproject.toml Makefile
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/pip install --quiet torch==2.13.0
	$(OLDEST_VENV)/bin/pip install --quiet -e ".[test]" "transformers==$(OLDEST_TRANSFORMERS)"
	touch $@

# The same suite on the oldest supported transformers (CI runs both ends of the verified range).
test-oldest: $(OLDEST_VENV)/bin/flowcut
	$(OLDEST_VENV)/bin/python -m pytest -q

lint: $(BIN)/flowcut
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build .pytest_cache
