# DiffuMatting for ComfyUI. `make test` is the whole suite (CI runs it through .ci/run).
PY := .venv/bin/python
MODEL ?=

.PHONY: setup test demo serve bench clean train-refiner

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: setup
	@$(PY) scripts/demo.py $(if $(MODEL),--model "$(MODEL)")

serve: setup
	$(PY) scripts/serve.py

# GreenPost's learned refiner: rewrites models/weights/greenpost_refiner.safetensors (seeded, CPU).
train-refiner: setup
	$(PY) train_refiner.py $(ARGS)

bench: setup
	@set -e; for f in tests/bench/*.py; do echo "== $$f"; $(PY) $$f; done

clean:
	rm -rf artifacts demo_out
