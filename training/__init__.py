"""ComfyUI glue used by the trainer and the tests (may import ComfyUI, unlike models/)."""
