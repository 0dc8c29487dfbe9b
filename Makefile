# Two commands on a fresh machine:
#   make demo   - install everything into .venv and run the main job on the tiny model + bundled corpus
#   make test   - install everything into .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins: the Phi-4 image processor needs torchvision, which must match torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The oldest supported transformers/peft (docs/compatibility.md), with the hub/tokenizers
# releases they need. Installed without dependencies into a folder layered over the venv with
# PYTHONPATH, so torch and everything else is shared, not installed twice.
COMPAT_SITE ?= .compat-site
COMPAT_SPEC ?= transformers==4.57.6 peft==0.18.0 huggingface_hub==0.36.2 tokenizers==0.22.2 requests==2.34.2 charset-normalizer==3.5.3
# Files holding the compat subset (tests/conftest.py COMPAT_SUBSET); only these are collected,
# since other test files import libraries (datasets) that need a newer huggingface_hub.
COMPAT_TESTS ?= test_official_layout test_train_loss test_model_load test_adapters test_verify_cli test_train_resume test_evaluate_e2e test_score test_doctor test_memory_plan test_lora_input_cast test_audio_padding test_attention

.PHONY: install system-deps demo test test-compat lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: system-deps $(VENV)/.installed

# espeak-ng speaks the generated corpus; without it the committed corpus is used.
# chromium + chromium-driver run the browser test of the scoring page (skipped without them).
# g++ lets torch.compile (eval.compile=true) build its kernels; its test is skipped without one.
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) 2>/dev/null || echo "note: espeak-ng not installed; using the committed corpus"; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) 2>/dev/null || echo "note: chromium/chromium-driver not installed; the browser test of the scoring page is skipped"; }
	@{ command -v c++ || command -v g++; } >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq g++ >/dev/null) 2>/dev/null || echo "note: g++ not installed; eval.compile=true and its test need a C++ compiler"; }

demo: install
	$(VENV)/bin/phi4mm-lora demo

$(COMPAT_SITE)/.installed: Makefile $(VENV)/.installed
	rm -rf $(COMPAT_SITE)
	$(PY) -m pip install -q --no-deps --target $(COMPAT_SITE) $(COMPAT_SPEC)
	touch $@

# Full suite on the newest versions, then the compat subset on the oldest transformers/peft.
test: install $(COMPAT_SITE)/.installed
	$(PY) -m pytest -q --durations=15 tests
	$(MAKE) --no-print-directory test-compat

test-compat: install $(COMPAT_SITE)/.installed
	PYTHONPATH=$(CURDIR)/$(COMPAT_SITE):$(CURDIR)/src $(PY) -m pytest -q -m compat $(COMPAT_TESTS:%=tests/%.py)

lint: install
	$(VENV)/bin/ruff check src tests
