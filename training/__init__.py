"""The headless trainer behind train.py.

- config.py: every setting declared once (type, choices, range, doc); validation and configs/default.toml
  derive from it.
- loop.py: run and resume; drives the stages through stage.py's interface: unet_stage.py (UNet / LoRA
  fine-tune with the green-background and detail losses) and head_stage.py (the matting head).
- session.py: what the stages share (device, models, data composers, text and latent caches).
- report.py: log.csv, sample grids, summary.json, the final lines.
- data.py (+ foreground.py), text.py, attention.py, state.py (checkpoints), lora.py, distributed.py,
  tiny_checkpoint.py (the `--preset tiny` checkpoint), host.py (headless ComfyUI import).
Unlike models/, it may import ComfyUI: the base model is built with ComfyUI's own loaders.

Also the GreenPost refiner's procedural training data (refiner_data.py, with refiner_objects.py and
refiner_kinds.py; plain numpy/OpenCV, no ComfyUI), used by train_refiner.py.
"""
