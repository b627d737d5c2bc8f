"""ComfyUI glue of the green-token key/value protection (models/green_protection.py).

- `kv_deltas(before, after, amount)`: the cross-attention key/value deltas a LoRA added to a MODEL (the
  patches core's load_lora_for_models put on `after` beyond those of `before`), computed with core's
  comfy.lora.calculate_weight on a zero weight and factorized, scaled by `amount`.
- `install(model, deltas)`: an attn2 replacement (ModelPatcher.set_model_attn2_replace) on each of those
  layers, plus a CALC_COND_BATCH wrapper (ModelPatcher.add_wrapper_with_key, the mechanism core's
  EasyCache uses) that reads, per prompt of the batch, the green token positions Green Canvas Prompt
  recorded in its conditioning and the prompt's context vectors there, and hands them to the layers in
  transformer_options under models.green_protection.OPTION_KEY.
- The text-encoder half: a LoRA's CLIP change moves the green token's context vector itself. The stack
  attaches to its CLIP output (ModelPatcher.set_attachments on the CLIP's patcher, kept by clones) the CLIP
  without the protected rows' LoRAs and the amount; Green Canvas Prompt then encodes the prompt with both
  and moves the green positions' context vectors that amount back to the unprotected CLIP's
  (`splice_green`). With amount 1 the green token reaches every layer exactly as without the protected
  LoRAs, every other token exactly as with them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..models.green_protection import OPTION_KEY, GreenKVLayer, KVDeltas, factorize, green_context

GREEN_TOKENS_KEY = "diffumatting_green_tokens"  # conditioning entry: {"l": [...], "g": [...]} positions
WRAPPER_KEY = "diffumatting_green_kv"
_KV = re.compile(r"^diffusion_model\.(?:input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))\.\d+\."
                 r"transformer_blocks\.(\d+)\.attn2\.to_([kv])\.weight$")
CONTEXT_ENCODERS = ("l", "g")  # the encoders whose tokens make the UNet's cross-attention context
GREEN_CLIP_KEY = "diffumatting_green_clip"


@dataclass(frozen=True)
class GreenClip:
    """Attached to a stack's CLIP output: the CLIP the green token is encoded with, and how far (0..1)
    Green Canvas Prompt moves the green positions toward its encoding."""

    clip: object
    amount: float


def green_clip_of(clip) -> GreenClip | None:
    patcher = getattr(clip, "patcher", None)
    return patcher.get_attachment(GREEN_CLIP_KEY) if patcher is not None else None


def attach_green_clip(clip, source: GreenClip) -> None:
    clip.patcher.set_attachments(GREEN_CLIP_KEY, source)


def splice_green(cond: list, clip, tokens: dict, positions: list[int]) -> list:
    """`cond` (clip's encoding of `tokens`) with the green positions' context vectors moved toward the
    encoding by the attached GreenClip (unchanged when none is attached or there is no green token)."""
    source = green_clip_of(clip)
    if source is None or not positions:
        return cond
    green_clip = source.clip.clone()
    if getattr(clip, "layer_idx", None) is not None:
        green_clip.clip_layer(clip.layer_idx)
    green = green_clip.encode_from_tokens_scheduled(tokens)
    if len(green) != len(cond) or any(g[0].shape != c[0].shape for g, c in zip(green, cond)):
        raise ValueError("the CLIP without the protected LoRAs encodes the prompt to another shape than the stack's "
                         "CLIP; connect Green Canvas Prompt straight to the LoRA stack's CLIP output")
    out = []
    for (c, extra), (g, _) in zip(cond, green):
        c = c.clone()
        c[:, positions] += source.amount * (g[:, positions].to(c) - c[:, positions])
        out.append([c, extra])
    return out


def layer_of(key: str) -> tuple[tuple[str, int, int], str] | None:
    """((block, index, transformer index), "k"/"v") of a cross-attention key/value weight key, else None."""
    m = _KV.match(key)
    if m is None:
        return None
    if m.group(1) is not None:
        block = ("input", int(m.group(1)))
    elif m.group(2) is not None:
        block = ("output", int(m.group(2)))
    else:
        block = ("middle", 0)
    return (*block, int(m.group(3))), m.group(4)


def require_unet(model) -> None:
    unet = model.get_model_object("diffusion_model")
    if not all(hasattr(unet, n) for n in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"green token k/v protection works on UNet models with cross-attention (SD1.x, SD2, "
                         f"SDXL); this MODEL is a {type(unet).__name__}. Use protection_mode 'all "
                         "cross-attention' or green_protection 0")


def kv_deltas(before, after, amount: float) -> dict[tuple[str, int, int], KVDeltas]:
    """Per attention layer, the key/value deltas `after` has beyond `before`, times `amount`."""
    import comfy.lora

    out: dict[tuple[str, int, int], KVDeltas] = {}
    for key, patches in after.patches.items():
        found = layer_of(key)
        if found is None:
            continue
        new = patches[len(before.patches.get(key, [])):]
        if not new:
            continue
        shape = after.get_model_object(key).shape
        delta = comfy.lora.calculate_weight(list(new), torch.zeros(shape, dtype=torch.float32), key)
        if not torch.isfinite(delta).all():
            raise ValueError(f"the LoRA's delta for {key} is not finite (a weight-decomposed LoRA such as DoRA "
                             "needs the base weight): use protection_mode 'all cross-attention' for it")
        layer, kind = found
        part = factorize(delta).scaled(amount)
        add = KVDeltas(k=(part,)) if kind == "k" else KVDeltas(v=(part,))
        out[layer] = out.get(layer, KVDeltas()).plus(add)
    return out


def installed(model) -> dict[tuple[str, int, int], KVDeltas]:
    """The protection deltas already on `model` (from an earlier stack), per layer."""
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return {key: p.deltas for key, p in replace.items() if isinstance(p, GreenKVLayer)}


def install(model, deltas: dict[tuple[str, int, int], KVDeltas]) -> None:
    """Put the protection for `deltas` (merged with any already installed) on `model`, a clone."""
    import comfy.patcher_extension

    if not deltas:
        return
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    merged = installed(model)
    for layer, d in deltas.items():
        other = replace.get(layer)
        if other is not None and not isinstance(other, GreenKVLayer):
            raise ValueError(f"cross-attention layer {layer} already has an attention replacement from another "
                             f"node ({type(other).__name__}); apply the LoRA stack before that node, or use "
                             "protection_mode 'all cross-attention'")
        merged[layer] = merged[layer].plus(d) if layer in merged else d
    for (block, index, tindex), d in merged.items():
        model.set_model_attn2_replace(GreenKVLayer(d), block, index, tindex)
    kind = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
    if not model.get_wrappers(kind, WRAPPER_KEY):
        model.add_wrapper_with_key(kind, WRAPPER_KEY, green_tokens_wrapper)


def positions_of(entry: dict) -> list[int] | None:
    """The green positions Green Canvas Prompt recorded in a conditioning entry (None: not recorded)."""
    recorded = entry.get(GREEN_TOKENS_KEY)
    if recorded is None:
        return None
    return sorted({int(p) for enc in CONTEXT_ENCODERS for p in recorded.get(enc, [])})


def green_table(conds) -> dict:
    """{cond uuid: GreenContext} of the prompts of one model call (lists: positive, negative, ...).

    In a guided call (a positive and a negative list) whose positive prompt records no positions, it is an
    error: the protection would do nothing (a plain CLIP Text Encode). Calls with one list (cfg 1, or
    guidance nodes such as SAG that run the negative prompt alone) take what is recorded."""
    table = {}
    guided = len(conds) >= 2 and conds[0] and conds[1] is not None
    if guided and all(positions_of(entry) is None for entry in conds[0]):
        raise ValueError("green token k/v protection needs to know where the word 'green' is in the prompt: "
                         "encode the positive prompt with Green Canvas Prompt (plain CLIP Text Encode does not "
                         "record it), or set the LoRA stack's protection_mode to 'all cross-attention'")
    for entries in conds:
        for entry in entries or []:
            positions = positions_of(entry)
            context = entry.get("cross_attn")
            if positions and context is not None:
                table[entry["uuid"]] = green_context(context, positions)
    return table


def green_tokens_wrapper(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: passes this call's green token data to the attn2 replacements."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    transformer_options[OPTION_KEY] = green_table(conds)
    options["transformer_options"] = transformer_options
    return executor(model, conds, x_in, timestep, options)
