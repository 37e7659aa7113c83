# Two commands: `make demo` (the built-in emoji pipeline) and `make test` (the whole suite).
# Both create .venv when missing and install what they need; nothing else is needed on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed first and pinned: on our machines pip takes exactly these from local files (see docs/install.md).
TORCH := torch==2.14.1 torchvision==0.29.1
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml Makefile | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[imagebind,generate,serve,test]'
	# Meta's ImageBind code; its declared deps (torchaudio, pytorchvideo, decord) are not needed by the model (docs/imagebind.md)
	$(PIP) --no-deps imagebind-unofficial==0.1.1
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory install && \
	$(BIN)/cart pipeline --config configs/emoji.yaml && \
	echo "make demo: finished in $$(( $$(date +%s) - start )) s, set-up included"

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) checkpoints/*/ .pytest_cache
