"""Turn any generation workflow into the dataset's unit of work.

The workflow (UI or API format) is converted once per run with scripts/comfy_client.ui_to_api. Then:
- every sampler seed (`seed`, `noise_seed`) is set per sample, and the positive prompt text (the text
  node upstream of each sampler's `positive`) gets the sample's prompt;
- the keying is the pack's own: the workflow's GreenPost node, or DiffuMatting VAE Decode (which keys
  with GreenPost itself without a head; with a head and refinement on, the refinement moves into a
  GreenPost node with the same default options, so the head's raw alpha can be compared);
- the workflow's own output nodes are dropped, and two Save Transparent PNG nodes (16 bit) are added:
  `key` (straight despilled foreground + GreenPost alpha) and `green` (the green original + the head's
  alpha, or opaque without a head), under `<prefix>/` in the server's output folder.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field

SAVE_NODE = "DiffuMattingSaveRGBA"
GREENPOST_NODE = "DiffuMattingGreenPost"
DECODE_NODE = "DiffuMattingVAEDecode"
SEED_INPUTS = ("seed", "noise_seed")
TEXT_INPUTS = ("text", "text_g", "text_l", "clip_l", "t5xxl")  # CLIP Text Encode, SDXL, Flux
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


class WorkflowPlanError(ValueError):
    """The workflow cannot be used to make a dataset; the message says what it lacks."""


@dataclass
class Plan:
    prompt: dict                       # API prompt with the dataset's save nodes
    text_targets: list[tuple[str, str]]
    seed_targets: list[tuple[str, str]]
    save_nodes: dict[str, str]         # "key" / "green" -> node id
    has_head: bool
    notes: list[str] = field(default_factory=list)

    def settings(self) -> dict:
        """Widget values of every node (links left out; the per-sample prompt, seed and file prefix shown as
        <prompt>, <seed>, <prefix>): the manifest's node settings."""
        per_sample = {**{t: "<prompt>" for t in self.text_targets}, **{t: "<seed>" for t in self.seed_targets},
                      **{(sid, "filename_prefix"): "<prefix>" for sid in self.save_nodes.values()}}
        out = {}
        for nid, node in self.prompt.items():
            vals = {k: per_sample.get((nid, k), v) for k, v in node["inputs"].items() if not _is_link(v)}
            out[f"{nid}:{node['class_type']}"] = vals
        return out

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.prompt, sort_keys=True).encode()).hexdigest()

    def model_files(self) -> list[str]:
        """File names of the models the workflow loads (any string input naming a model file)."""
        names = set()
        for node in self.prompt.values():
            for v in node["inputs"].values():
                if isinstance(v, str) and v.lower().endswith(MODEL_SUFFIXES):
                    names.add(v)
        return sorted(names)


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def _positive_texts(prompt: dict, start: str) -> list[tuple[str, str]]:
    """Text inputs of the nearest text nodes upstream of node `start` (breadth first)."""
    found, frontier, seen = [], [start], set()
    while frontier and not found:
        nxt = []
        for nid in frontier:
            if nid in seen or nid not in prompt:
                continue
            seen.add(nid)
            inputs = prompt[nid]["inputs"]
            texts = [(nid, k) for k in TEXT_INPUTS if isinstance(inputs.get(k), str)]
            if texts:
                found.extend(texts)
                continue
            nxt.extend(v[0] for v in inputs.values() if _is_link(v))
        frontier = nxt
    return found


def _new_id(prompt: dict, used: set) -> str:
    n = max([int(k) for k in prompt if str(k).isdigit()] + [0]) + 1
    while str(n) in used or str(n) in prompt:
        n += 1
    used.add(str(n))
    return str(n)


def widget_defaults(object_info: dict, class_type: str) -> dict:
    """The default value of every widget input of `class_type` in the server's /object_info (a list's first
    option where no default is given). A node queued without its widget values is refused by the server
    ("Required input is missing"), which then drops that output and still runs the rest."""
    out = {}
    spec = object_info[class_type]["input"]
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(kind, list) and kind:          # older list form of a Combo
                out[name] = kind[0]
            elif kind == "COMBO" and opts.get("options"):   # V3 Combo
                out[name] = opts["options"][0]
    return out


def _keying(prompt: dict, used: set, notes: list, object_info: dict) -> tuple[list, list, list | None]:
    """(key rgba output, green original output, head alpha output or None) as [node id, slot] links."""
    gps = [nid for nid, n in prompt.items() if n["class_type"] == GREENPOST_NODE]
    if len(gps) > 1:
        raise WorkflowPlanError(f"the workflow has {len(gps)} GreenPost nodes ({', '.join(gps)}); keep one, the "
                                f"one whose output the dataset should store")
    if gps:
        gp = prompt[gps[0]]["inputs"]
        if not _is_link(gp.get("image")):
            raise WorkflowPlanError(f"GreenPost node {gps[0]} has no image connected")
        prior = gp.get("alpha_prior")
        return [gps[0], 2], gp["image"], prior if _is_link(prior) else None
    decs = [nid for nid, n in prompt.items() if n["class_type"] == DECODE_NODE]
    if len(decs) != 1:
        raise WorkflowPlanError(f"the workflow has no GreenPost node and {len(decs)} DiffuMatting VAE Decode "
                                f"nodes; the dataset needs one of them to key the generated image (add GreenPost "
                                f"after the decode)")
    did = decs[0]
    dec = prompt[did]["inputs"]
    if not _is_link(dec.get("head")):
        return [did, 2], [did, 0], None
    if not dec.get("refine_with_greenpost", True):
        raise WorkflowPlanError(f"DiffuMatting VAE Decode {did} has a head but refine_with_greenpost is off and "
                                f"no GreenPost node follows; turn refinement on or add a GreenPost node")
    dec["refine_with_greenpost"] = False
    gid = _new_id(prompt, used)
    prompt[gid] = {"class_type": GREENPOST_NODE,
                   "inputs": {**widget_defaults(object_info, GREENPOST_NODE), "image": [did, 0],
                              "alpha_prior": [did, 1]},
                   "_meta": {"title": "GreenPost (dataset: decode refinement, default options)"}}
    notes.append(f"decode {did}: head refinement moved into GreenPost node {gid} (same default options)")
    return [gid, 2], [did, 0], [did, 1]


def plan_workflow(api_prompt: dict, object_info: dict) -> Plan:
    """Adapt an API-format workflow; raises WorkflowPlanError naming what is missing."""
    prompt = copy.deepcopy(api_prompt)
    unknown = sorted({n["class_type"] for n in prompt.values() if n["class_type"] not in object_info})
    if unknown:
        raise WorkflowPlanError(f"the server does not know the node types {unknown}; install their custom nodes")
    seeds = [(nid, k) for nid, n in prompt.items() for k in SEED_INPUTS if isinstance(n["inputs"].get(k), int)]
    # KSampler-style nodes take `positive`; Flux-style guiders (BasicGuider) take `conditioning`.
    samplers = [(nid, "positive") for nid, n in prompt.items() if _is_link(n["inputs"].get("positive"))]
    samplers += [(nid, "conditioning") for nid, n in prompt.items()
                 if "Guider" in n["class_type"] and _is_link(n["inputs"].get("conditioning"))]
    if not seeds or not samplers:
        raise WorkflowPlanError("the workflow has no sampler with a seed and a positive prompt (e.g. KSampler); "
                                "the dataset sets a prompt and a seed per sample, so it needs a generation workflow")
    texts = []
    for nid, socket in samplers:
        for t in _positive_texts(prompt, prompt[nid]["inputs"][socket][0]):
            if t not in texts:
                texts.append(t)
    if not texts:
        raise WorkflowPlanError(f"no text input ({', '.join(TEXT_INPUTS)}) found upstream of the sampler's "
                                f"positive conditioning; use a prompt node such as CLIP Text Encode or Green Prompt")
    used: set = set()
    notes: list = []
    key, green, head = _keying(prompt, used, notes, object_info)
    for nid in [nid for nid, n in prompt.items() if object_info[n["class_type"]].get("output_node")]:
        del prompt[nid]
    saves = {}
    for role, image, alpha in (("key", key, None), ("green", green, head)):
        sid = _new_id(prompt, used)
        inputs = {"image": image, "filename_prefix": role, "bit_depth": "16", "trim": False, "padding": 0,
                  "save_matte": False}
        if alpha is not None:
            inputs["alpha"] = alpha
        prompt[sid] = {"class_type": SAVE_NODE, "inputs": inputs, "_meta": {"title": f"dataset {role}"}}
        saves[role] = sid
    return Plan(prompt, texts, seeds, saves, head is not None, notes)


def job_prompt(plan: Plan, text: str, seed: int, prefix: str) -> dict:
    """The API prompt of one sample: its text, its seed, its files under `prefix/` on the server."""
    prompt = copy.deepcopy(plan.prompt)
    for nid, k in plan.text_targets:
        prompt[nid]["inputs"][k] = text
    for nid, k in plan.seed_targets:
        prompt[nid]["inputs"][k] = int(seed)
    for role, sid in plan.save_nodes.items():
        prompt[sid]["inputs"]["filename_prefix"] = f"{prefix}/{role}"
    return prompt
