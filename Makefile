# DiffuMatting for ComfyUI. `make test` is the whole suite (CI runs it through .ci/run).
PY := .venv/bin/python
MODEL ?=

.PHONY: setup test demo serve bench clean dataset dataset-demo train-refiner

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

# make dataset OUT=dir ARGS="--servers http://127.0.0.1:8188 --prompts p.txt"  (see make_dataset.py --help)
dataset: setup
	@test -n "$(OUT)" || { echo 'give OUT=folder (and ARGS="--servers URL ..." or "--launch N --comfy-base DIR")'; exit 2; }
	@$(PY) make_dataset.py --out "$(OUT)" $(ARGS)

# 2 local servers with the tiny test model, 8 samples; the last line printed is the output folder
dataset-demo: setup
	@$(PY) make_dataset.py --demo --out "$(or $(OUT),dataset_demo)"

bench: setup
	@set -e; for f in tests/bench/*.py; do echo "== $$f"; $(PY) $$f; done

clean:
	rm -rf artifacts demo_out dataset_demo
