# Two entry points for a fresh machine; each builds its own virtual environment in .venv.
# torch==2.13.0 is installed first: on the project's machines it is a local CPU wheel, while any
# other torch requirement would pull several GB of CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/flowcut: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/flowcut
	$(BIN)/python scripts/make_demo_model.py build/demo
	$(BIN)/flowcut generate --model build/demo/model --image build/demo/image.png \
		--prompt "What is the colour of the circle?" --keep 64 --max-new-tokens 8

test: $(BIN)/flowcut
	$(BIN)/python -m pytest -q

lint: $(BIN)/flowcut
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build .pytest_cache
