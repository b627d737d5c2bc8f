"""DiffuMatting for ComfyUI: transparent-object generation, matting-head decoding and GreenPost keying.

ComfyUI imports this file as the pack's module. It only exposes the V3 entry point and the web
folder; nothing is downloaded or written at import time.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
