"""The headless trainer behind train.py: config (config.py), data (data.py), the two-stage loop (loop.py),
green-attention capture (attention.py), checkpoints and resume (state.py), LoRA export (lora.py),
multi-process setup (distributed.py), the tiny `--preset tiny` checkpoint (tiny_checkpoint.py) and the
headless ComfyUI import (host.py). Unlike models/, it may import ComfyUI: the base model is built with
ComfyUI's own loaders.

Also the GreenPost refiner's procedural training data (refiner_data.py, with refiner_objects.py and
refiner_kinds.py; plain numpy/OpenCV, no ComfyUI), used by train_refiner.py."""
