# The two commands of the README: `make serve` (the main job on the bundled model) and `make test`.
# Each does all set-up first (scripts/setup.sh is idempotent and reuses the cached engine build).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup serve test bench clean
setup:
	scripts/setup.sh

serve: setup
	$(VENV)/bin/ccmoe-run serve --device auto

test:
	scripts/setup.sh --train
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) vendor/llama.cpp
