"""Core of DiffuMatting: plain torch/numpy code, tensors in and tensors out.

Nothing in this package imports ComfyUI; the nodes (nodes/) and the trainer (train.py) both use it.
"""
