"""LoRA stack: several LoRAs in one node, a LORA_STACK in/out, model-only mode and green protection.

LORA_STACK follows the common convention of other packs: a list of (lora_name, model_strength,
clip_strength) tuples, names relative to models/loras.

Green protection: the DiffuMatting UNet learns the green backing through the cross-attention of the
"green" token (the paper's green-background control loss acts on those attention maps), so the backing is
decided where text reaches the image, in the cross-attention layers (attn2). Protection scales a style
LoRA's deltas in those layers by (1 - green_protection) and keeps its other deltas (self-attention,
convolutions, feed-forward, text encoder), where most of a style lives. The "green token k/v" mode is
narrower: the LoRA is applied whole, and only its change to the key and value of the "green" token (the
positions Green Canvas Prompt records) is removed, inside the attention layers while sampling; every other
token's key and value keep the LoRA's change exactly (models/green_protection.py, nodes/_green_kv.py).
"""
from __future__ import annotations

import math
from enum import Enum

from comfy_api.latest import io

from . import _green_kv
from ._files import model_files, resolve_model_file
from ._schema import CATEGORY, enum_options, enum_value, schema

FAMILY = f"{CATEGORY}/generate"
ROWS = 4
NONE = "None"
CROSS_ATTENTION_MARK = "attn2"
LoraStackType = io.Custom("LORA_STACK")


class ProtectionMode(str, Enum):
    CROSS_ATTENTION = "all cross-attention"
    GREEN_KV = "green token k/v"


def lora_files() -> list[str]:
    return model_files("loras")


def resolve_lora(name: str) -> str:
    return resolve_model_file(name, ("loras",), "LoRA")


def load_lora_file(name: str) -> dict:
    import comfy.utils

    path = resolve_lora(name)
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:
        raise ValueError(f"LoRA {name!r} cannot be read ({type(e).__name__}: {e}); the file is damaged or not "
                         f"a LoRA") from e
    if not sd:
        raise ValueError(f"LoRA {name!r} holds no tensors")
    return sd


def split_cross_attention(lora: dict) -> tuple[dict, dict]:
    """(cross-attention entries, the rest), by key name (kohya `..._attn2_to_k...`, diffusers `.attn2.`)."""
    cross = {k: v for k, v in lora.items() if CROSS_ATTENTION_MARK in k}
    rest = {k: v for k, v in lora.items() if CROSS_ATTENTION_MARK not in k}
    return cross, rest


def require_cross_attention(model, green_protection: float) -> None:
    """'all cross-attention' protection scales attn2 deltas: refuse a model that has no attn2 layer (Flux's
    text and image tokens share joint attention), where it would silently do nothing."""
    unet = model.get_model_object("diffusion_model")
    if not any(name.rsplit(".", 1)[-1] == CROSS_ATTENTION_MARK for name, _ in unet.named_modules()):
        raise ValueError(f"green_protection {green_protection} scales the LoRAs' cross-attention (attn2) deltas, "
                         f"and this MODEL ({type(unet).__name__}) has no cross-attention layer: its text and image "
                         "tokens share joint attention (Flux), so nothing would be protected. Set green_protection "
                         "to 0 (or turn off the rows' protect switch) for this model")


def normalise_stack(stack) -> list[tuple[str, float, float]]:
    if stack is None:
        return []
    if not isinstance(stack, (list, tuple)):
        raise ValueError(f"lora_stack must be a list of (name, model_strength, clip_strength), got "
                         f"{type(stack).__name__}")
    out = []
    for i, entry in enumerate(stack):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"lora_stack entry {i} is {entry!r}; expected (name, model_strength, clip_strength)")
        name, ms, cs = entry
        try:
            ms, cs = float(ms), float(cs)
        except (TypeError, ValueError):
            raise ValueError(f"lora_stack entry {i} ({name!r}) has strengths {entry[1]!r}, {entry[2]!r}; expected "
                             f"numbers") from None
        if not (math.isfinite(ms) and math.isfinite(cs)):
            raise ValueError(f"LoRA {name!r} has strength model={ms}, clip={cs}; strengths must be finite numbers "
                             f"(e.g. 1.0); set the row's strength again")
        out.append((str(name), ms, cs))
    return out


def apply_lora(model, clip, lora: dict, strength_model: float, strength_clip: float,
               green_protection: float = 0.0):
    """Apply one LoRA state dict with core's comfy.sd.load_lora_for_models; returns (model, clip).

    A side with strength 0 (or None) is returned unchanged. green_protection scales the cross-attention
    deltas of the model by (1 - green_protection).
    """
    import comfy.sd

    use_model = model is not None and strength_model != 0
    use_clip = clip is not None and strength_clip != 0
    if not (use_model or use_clip):
        return model, clip
    p = float(green_protection)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"green_protection {p} must be in 0..1")
    if p == 0.0 or not use_model:
        m, c = comfy.sd.load_lora_for_models(model if use_model else None, clip if use_clip else None,
                                             lora, strength_model, strength_clip)
    else:
        cross, rest = split_cross_attention(lora)
        m, c = comfy.sd.load_lora_for_models(model, clip if use_clip else None, rest, strength_model,
                                             strength_clip)
        scaled = strength_model * (1.0 - p)
        if cross and scaled != 0:
            m, _ = comfy.sd.load_lora_for_models(m, None, cross, scaled, 0.0)
    return (m if use_model else model), (c if use_clip else clip)


def _patch_count(model, clip) -> int | None:
    """Patch entries on a MODEL and a CLIP (a LoRA adds one per weight it matches); None if not countable."""
    patchers = [p for p in (model, getattr(clip, "patcher", None)) if p is not None]
    if not all(isinstance(getattr(p, "patches", None), dict) for p in patchers):
        return None
    return sum(len(v) for p in patchers for v in p.patches.values())


def apply_stack(model, clip, stack, model_only: bool = False, green_protection: float = 0.0,
                unprotected: frozenset[int] = frozenset(),
                mode: ProtectionMode = ProtectionMode.CROSS_ATTENTION):
    """Apply every (name, model_strength, clip_strength) of `stack` in order; returns (model, clip).

    Entries whose index is in `unprotected` are applied at full strength whatever `green_protection` is
    (a LoRA trained with the DiffuMatting trainer must never be damped). A LoRA that matches none of the
    weights it is applied to is an error (another model family). In GREEN_KV mode each LoRA is applied
    whole and `green_protection` of its key/value change on the green token is removed while sampling."""
    mode = ProtectionMode(mode)
    green_protection = float(green_protection)
    if not 0.0 <= green_protection <= 1.0:
        raise ValueError(f"green_protection {green_protection} must be in 0..1")
    green_kv = {}
    entries = normalise_stack(stack)
    if mode is ProtectionMode.CROSS_ATTENTION and green_protection > 0 and model is not None \
            and any(ms != 0 and i not in unprotected for i, (_, ms, _) in enumerate(entries)):
        require_cross_attention(model, green_protection)
    clip_in = clip
    earlier = _green_kv.green_clip_of(clip) if clip is not None and not model_only else None
    green_clip, amount = _start_green_clip(clip, earlier, mode, green_protection, model_only)
    clip_protected = False
    for i, (name, ms, cs) in enumerate(entries):
        if ms == 0 and (cs == 0 or model_only or clip is None):
            continue
        lora = load_lora_file(name)
        protection = 0.0 if i in unprotected else green_protection
        before = _patch_count(model, None if model_only else clip)
        model_in = model
        if mode is ProtectionMode.GREEN_KV:
            model, clip_out = apply_lora(model, None if model_only else clip, lora, ms, cs, 0.0)
            if protection > 0 and ms != 0:
                _green_kv.require_unet(model)
                for layer, d in _green_kv.kv_deltas(model_in, model, protection).items():
                    green_kv[layer] = green_kv[layer].plus(d) if layer in green_kv else d
        else:
            model, clip_out = apply_lora(model, None if model_only else clip, lora, ms, cs, protection)
        if green_clip is not None and cs != 0:
            if mode is ProtectionMode.GREEN_KV and protection > 0:
                clip_protected = True
            else:  # unprotected: the green token gets it too
                green_clip = apply_lora(None, green_clip, lora, 0.0, cs)[1]
        if before is not None and _patch_count(model, None if model_only else clip_out) == before:
            raise ValueError(f"LoRA {name!r} matches none of the weights of this "
                             f"{'MODEL' if model_only or clip is None else 'MODEL or CLIP'}: it was made for another "
                             f"model family (e.g. an SDXL LoRA on an SD1.5 checkpoint) or is not a LoRA; pick a "
                             f"LoRA trained for this checkpoint")
        if not model_only:
            clip = clip_out
    _green_kv.install(model, green_kv)
    if green_clip is not None and clip is not clip_in and (clip_protected or earlier is not None):
        _green_kv.attach_green_clip(clip, _green_kv.GreenClip(green_clip, amount))
    return model, clip


def _start_green_clip(clip, earlier, mode: ProtectionMode, amount: float, model_only: bool):
    """(the CLIP the green token is encoded with, the amount Green Canvas Prompt moves it), or (None, 0)
    when there is none to keep: the one an earlier GREEN_KV stack attached to `clip`, else in GREEN_KV mode
    the incoming CLIP."""
    kv = mode is ProtectionMode.GREEN_KV and amount > 0 and not model_only and clip is not None
    if earlier is not None:
        if kv and earlier.amount != amount:
            raise ValueError(f"this CLIP comes from a LoRA stack with green_protection {earlier.amount} in 'green "
                             f"token k/v' mode and this stack has {amount}; chained stacks in that mode need the "
                             "same green_protection")
        return earlier.clip, earlier.amount
    return (clip, amount) if kv else (None, 0.0)


def _row_inputs() -> list:
    files = [NONE, *lora_files()]
    inputs = []
    for i in range(1, ROWS + 1):
        inputs += [
            io.Combo.Input(f"lora_{i}", options=files, default=NONE,
                           tooltip=f"Row {i}: LoRA file in models/loras (None = empty row)."),
            io.Boolean.Input(f"on_{i}", default=True, tooltip=f"Row {i}: apply this LoRA (off = skip the row)."),
            io.Float.Input(f"model_strength_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                           tooltip=f"Row {i}: strength on the diffusion model (0 = leave the model alone)."),
            io.Float.Input(f"clip_strength_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                           tooltip=f"Row {i}: strength on the text encoder (ignored in model-only mode)."),
            io.Boolean.Input(f"protect_{i}", default=True,
                             tooltip=f"Row {i}: apply green_protection to this LoRA. Turn off for a LoRA "
                                     "trained with the DiffuMatting trainer (it must never be damped)."),
        ]
    return inputs


class LoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffuMattingLoraStack",
            display_name="LoRA Stack (green protected)",
            category=FAMILY,
            description=f"Applies up to {ROWS} LoRAs (rows: file, on/off, model and clip strength) plus any "
                        "incoming LORA_STACK, with core's LoRA loading. Chain stacks through lora_stack for "
                        "more rows. green_protection keeps style LoRAs from repainting the green backing: "
                        "by scaling their cross-attention deltas, or (protection_mode 'green token k/v') by "
                        "removing only their change to the word 'green'; a row's protect switch opts it out.",
            search_aliases=["lora stack", "lora stacker", "multiple loras", "lora loader", "style lora"],
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL to patch (a clone is returned)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text encoder to patch; leave unconnected for model-only use."),
                LoraStackType.Input("lora_stack", optional=True,
                                    tooltip="LoRAs from another stack node, applied before this node's rows. "
                                            "A list of (name, model_strength, clip_strength)."),
                io.Boolean.Input("model_only", default=False,
                                 tooltip="Patch only the diffusion model; the CLIP passes through unchanged."),
                io.Float.Input("green_protection", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="0 = apply LoRAs as core does. Up to 1 = scale their cross-attention "
                                       "deltas down, where the green backing is decided, keeping the rest "
                                       "of the style (SD1.x/SDXL: Flux has no cross-attention layer, keep 0)."),
                *_row_inputs(),
                io.Combo.Input("protection_mode", options=enum_options(ProtectionMode),
                               default=ProtectionMode.CROSS_ATTENTION.value,
                               tooltip="How green_protection acts. all cross-attention: scale every "
                                       "cross-attention delta of the LoRAs. green token k/v: apply the LoRAs "
                                       "whole and remove only their change to the key and value of the word "
                                       "'green' while sampling (SD1.x/SDXL; encode the prompt with Green Canvas "
                                       "Prompt, which records where 'green' is)."),
            ],
            outputs=[
                io.Model.Output("MODEL", display_name="MODEL", tooltip="The MODEL with the LoRAs applied."),
                io.Clip.Output("CLIP", display_name="CLIP",
                               tooltip="The CLIP with the LoRAs applied (unchanged in model-only mode; None "
                                       "when no CLIP was connected)."),
                LoraStackType.Output("LORA_STACK", display_name="LORA_STACK",
                                     tooltip="The incoming stack plus this node's active rows, for other nodes "
                                             "that take a LORA_STACK. Do not also feed it to a stack that "
                                             "gets this node's MODEL, or the LoRAs apply twice."),
            ],
        )

    @classmethod
    def execute(cls, model, clip=None, lora_stack=None, model_only=False, green_protection=0.0,
                protection_mode=ProtectionMode.CROSS_ATTENTION.value, **rows) -> io.NodeOutput:
        stack = normalise_stack(lora_stack)
        unprotected = set()
        for i in range(1, ROWS + 1):
            name = rows.get(f"lora_{i}", NONE)
            if name in (None, "", NONE) or not rows.get(f"on_{i}", True):
                continue
            ms = float(rows.get(f"model_strength_{i}", 1.0))
            cs = float(rows.get(f"clip_strength_{i}", 1.0))
            if ms == 0 and cs == 0:
                continue
            if not rows.get(f"protect_{i}", True):
                unprotected.add(len(stack))
            stack.append((str(name), ms, cs))
        out_model, out_clip = apply_stack(model, clip, stack, model_only=bool(model_only),
                                          green_protection=float(green_protection),
                                          unprotected=frozenset(unprotected),
                                          mode=enum_value(ProtectionMode, protection_mode, "protection_mode"))
        return io.NodeOutput(out_model, out_clip, stack)


NODES = [LoraStack]
