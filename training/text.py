"""Captions to UNet conditioning, and which "green" tokens the green-background loss supervises.

The paper's control loss pulls the attention of the canvas phrase's "green" token toward the background.
A caption may say "green" itself ("a green apple"); that token describes the object and must keep its
own attention. `phrase_green_positions` therefore finds the canvas phrase inside the caption's tokens
(its last occurrence: `add_green_phrase` appends it) and returns the green positions inside it only.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..models.prompting import GREEN_WORD, find_subsequence, green_token_positions, strip_special

TEXT_CACHE_SIZE = 4096


def phrase_green_positions(token_ids: Sequence[int], phrase_ids: Sequence[int], green_ids: Sequence[int]) -> list[int]:
    """Positions of the "green" tokens of the LAST occurrence of `phrase_ids` in `token_ids` ([] if absent).

    `phrase_ids` and `green_ids` are tokenizations without start/end/padding tokens.
    """
    phrase_ids = [int(t) for t in phrase_ids]
    starts = find_subsequence([int(t) for t in token_ids], phrase_ids)
    if not starts:
        return []
    inside = green_token_positions(phrase_ids, green_ids)
    return [starts[-1] + i for i in inside]


def token_ids(tokens) -> list[int]:
    """Flat token ids of a ComfyUI `clip.tokenize` result (the first encoder's, e.g. CLIP-L)."""
    chunks = tokens.get("l") or next(iter(tokens.values()))
    return [int(t[0]) for chunk in chunks for t in chunk]


class TextEncoder:
    """Caption -> (cond (1,T,C), pooled or None, supervised green positions), LRU-cached on the CPU.

    `mode` "phrase": only the canvas phrase's green tokens; "all": every green token of the caption.
    """

    def __init__(self, clip, phrase: str, mode: str = "phrase"):
        if mode not in ("phrase", "all"):
            raise ValueError(f"green token mode {mode!r}: use 'phrase' or 'all'")
        self.clip = clip
        self.phrase = phrase
        self.mode = mode
        self._cache: OrderedDict = OrderedDict()
        special = set(token_ids(clip.tokenize("")))
        self.green_ids = strip_special(token_ids(clip.tokenize(GREEN_WORD)), special)
        self.phrase_ids = strip_special(token_ids(clip.tokenize(phrase)), special)
        if mode == "phrase" and not green_token_positions(self.phrase_ids, self.green_ids):
            raise ValueError(f"unet.phrase {phrase!r} has no token 'green': the green loss supervises the "
                             f"phrase's 'green'; use a phrase such as 'on a flat green screen background'")

    def green_positions(self, ids: list[int]) -> list[int]:
        if self.mode == "phrase":
            return phrase_green_positions(ids, self.phrase_ids, self.green_ids)
        return green_token_positions(ids, self.green_ids)

    def __call__(self, text: str):
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        tokens = self.clip.tokenize(text)
        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        pos = self.green_positions(token_ids(tokens)) if text else []
        hit = (cond.float().cpu(), None if pooled is None else pooled.float().cpu(), pos)
        self._cache[text] = hit
        if len(self._cache) > TEXT_CACHE_SIZE:
            self._cache.popitem(last=False)
        return hit
