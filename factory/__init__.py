"""The dataset factory behind make_dataset.py: jobs and ids, workflow adaptation, the multi-server
scheduler (ComfyUI's HTTP + websocket API) and the output folder (manifest, resume, rejects).

Standard library + numpy/OpenCV + aiohttp (a ComfyUI dependency); nothing here imports ComfyUI.
"""
