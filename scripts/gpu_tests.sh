#!/usr/bin/env bash
# The in-process tests of the nodes and models on a machine with a CUDA GPU: there ComfyUI puts the models on
# the GPU (the UNet in fp16 or bf16), so these runs check the nodes' device moves and the GPU's precision. The
# real-server and browser tests are left out: they need ComfyUI's frontend package, which `make setup` installs
# into .venv (on the GPU machine python3 is whatever holds torch and ComfyUI's requirements).
#
#   scripts/gpu_tests.sh            # PYTHON (default: .venv/bin/python when present, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, torch.cuda.get_device_name(0) if ok else 'no CUDA GPU'); sys.exit(0 if ok else 'scripts/gpu_tests.sh needs a CUDA GPU; on the CPU run make test')"
exec "$PY" -m pytest -q -p no:cacheprovider -rfEs \
  tests/test_matting_decode.py tests/test_lora_stack.py tests/test_export_nodes.py tests/test_generate.py \
  tests/test_bad_input_nodes.py tests/test_greenpost.py tests/test_matting_head.py tests/test_refiner.py \
  --deselect tests/test_matting_decode.py::test_txt2img_matting_workflow_alpha_is_the_nodes "$@"
