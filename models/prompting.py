"""Green-screen prompting: the phrase the DiffuMatting UNet is trained with, and which tokens carry "green".

Tokenizer-agnostic: positions are found from token ids (or words) given by the caller; nothing here loads
a tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence

DEFAULT_GREEN_PHRASE = "isolated on a flat green screen background"
GREEN_WORD = "green"


def add_green_phrase(prompt: str, phrase: str = DEFAULT_GREEN_PHRASE) -> str:
    """Append `phrase` to `prompt` with a comma, unless the prompt already contains it (case-insensitive).

    An empty phrase returns the prompt unchanged; an empty prompt returns the phrase.
    """
    prompt = (prompt or "").strip()
    phrase = (phrase or "").strip()
    if not phrase:
        return prompt
    if phrase.lower() in prompt.lower():
        return prompt
    if not prompt:
        return phrase
    return f"{prompt.rstrip(' ,')}, {phrase}"


def find_subsequence(seq: Sequence, sub: Sequence) -> list[int]:
    """Start indices of every (non-overlapping) occurrence of `sub` in `seq`."""
    seq, sub = list(seq), list(sub)
    n = len(sub)
    if n == 0:
        return []
    starts, i = [], 0
    while i <= len(seq) - n:
        if seq[i:i + n] == sub:
            starts.append(i)
            i += n
        else:
            i += 1
    return starts


def green_token_positions(token_ids: Sequence[int], green_ids: Sequence[int]) -> list[int]:
    """Positions in `token_ids` of the tokens that spell the word "green".

    `green_ids` is the tokenization of the bare word (without start/end/padding tokens); every token of
    every occurrence is returned, so a word split into several sub-word tokens gives all of them.
    """
    green_ids = [int(t) for t in green_ids]
    if not green_ids:
        raise ValueError("green_ids is empty: pass the token ids of the word 'green' without start/end tokens")
    pos = []
    for start in find_subsequence([int(t) for t in token_ids], green_ids):
        pos.extend(range(start, start + len(green_ids)))
    return pos


def word_positions(words: Sequence[str], target: str = GREEN_WORD) -> list[int]:
    """Positions of `target` in a word list (case-insensitive, punctuation around a word ignored)."""
    t = target.lower()
    return [i for i, w in enumerate(words) if w.strip(".,;:!?()[]{}\"'").lower() == t]


def special_token_ids(empty_ids: Sequence[int]) -> set[int]:
    """The start/end/padding ids, given the tokenization of an empty prompt."""
    return {int(t) for t in empty_ids}


def strip_special(ids: Sequence[int], special: set[int]) -> list[int]:
    """`ids` without start/end/padding tokens."""
    return [int(t) for t in ids if int(t) not in special]
