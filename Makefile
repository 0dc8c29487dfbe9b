# Two commands on a fresh machine:
#   make demo   - install everything into .venv and run the main job on the tiny model + bundled corpus
#   make test   - install everything into .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins: the Phi-4 image processor needs torchvision, which must match torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install system-deps demo test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: system-deps $(VENV)/.installed

# espeak-ng speaks the generated corpus; without it the committed corpus is used.
# chromium + chromium-driver run the browser test of the scoring page (skipped without them).
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) 2>/dev/null || echo "note: espeak-ng not installed; using the committed corpus"; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) 2>/dev/null || echo "note: chromium/chromium-driver not installed; the browser test of the scoring page is skipped"; }

demo: install
	$(VENV)/bin/phi4mm-lora demo

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check src tests
