"""models/green_protection.py (plain torch): low-rank deltas, removing a delta's action on the green tokens
only, the attention the replacement runs."""
from __future__ import annotations

import pytest
import torch

from diffumatting.models.green_protection import (OPTION_KEY, GreenKVLayer, KVDeltas, LowRank, attend, factorize,
                                                   green_context, remove_green_deltas)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rank,shape", [(4, (40, 64)), (1, (64, 40)), (0, (8, 8))])
def test_factorize_reproduces_low_rank_deltas_with_their_rank(rank, shape):
    g = _gen()
    delta = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    lr = factorize(delta, start_rank=8)
    assert torch.allclose(lr.dense(), delta, atol=1e-5 * max(1.0, float(delta.abs().max())))
    assert lr.up.shape[1] <= 8, "a rank-r delta needs no more than the first width"


def test_factorize_keeps_a_full_rank_delta_exactly():
    delta = torch.randn(24, 40, generator=_gen(1))
    lr = factorize(delta, start_rank=4)
    assert torch.allclose(lr.dense(), delta, atol=1e-6)
    with pytest.raises(ValueError, match="matrix"):
        factorize(torch.zeros(3, 4, 5))


def test_only_green_positions_lose_the_delta_and_padding_repeats_are_found():
    g = _gen(2)
    ctx, inner, tokens = 16, 12, 5
    w, d = torch.randn(inner, ctx, generator=g), torch.randn(inner, 3, generator=g) @ torch.randn(3, ctx, generator=g)
    cond = torch.randn(1, tokens, ctx, generator=g)          # a prompt of 5 tokens, green at 1 and 3
    other = torch.randn(1, 2 * tokens, ctx, generator=g)      # a 10-token prompt: the first is repeated to 10
    context = torch.cat([cond.repeat(1, 2, 1), other]).repeat_interleave(2, dim=0)  # 2 chunks x batch 2
    k = context @ (w + d).T
    table = {"c": green_context(cond, [3, 1])}
    deltas = KVDeltas(k=(factorize(d),), v=(factorize(d).scaled(0.5),))
    k_out, v_out = remove_green_deltas(k, k.clone(), deltas, table, ["c", "u"])
    base = context @ w.T
    green = [1, 3, 6, 8]
    assert torch.allclose(k_out[:2, green], base[:2, green], atol=1e-4), "green keys are the base weights'"
    assert torch.allclose(v_out[:2, green], (k - 0.5 * (context @ d.T))[:2, green], atol=1e-4)
    rest = [t for t in range(2 * tokens) if t not in green]
    assert torch.equal(k_out[:2, rest], k[:2, rest]) and torch.equal(k_out[2:], k[2:]), "others untouched"
    assert torch.equal(k, context @ (w + d).T), "the input is not changed in place"


def test_bad_positions_and_lengths_are_refused():
    cond = torch.zeros(1, 5, 4)
    with pytest.raises(ValueError, match=r"positions \[7\] are outside the prompt's 5 tokens"):
        green_context(cond, [7])
    table = {"c": green_context(cond, [1])}
    k = torch.zeros(1, 7, 3)
    with pytest.raises(ValueError, match="7 context tokens, the prompt had 5"):
        remove_green_deltas(k, k, KVDeltas(k=(LowRank(torch.ones(3, 1), torch.ones(1, 4)),)), table, ["c"])


def test_layer_is_plain_attention_without_green_data_and_attend_is_softmax_attention():
    g = _gen(3)
    q, k, v = (torch.randn(2, 6, 8, generator=g) for _ in range(3))
    heads, d = 2, 4
    qh, kh, vh = (x.view(2, 6, heads, d).transpose(1, 2) for x in (q, k, v))
    ref = (torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, -1) @ vh).transpose(1, 2).reshape(2, 6, 8)
    assert torch.allclose(attend(q, k, v, heads), ref, atol=1e-5)
    layer = GreenKVLayer(KVDeltas(k=(factorize(torch.ones(8, 8)),)))
    assert torch.allclose(layer(q, k, v, {"n_heads": heads}), ref, atol=1e-5)
    assert torch.allclose(layer(q, k, v, {"n_heads": heads, OPTION_KEY: {}, "uuids": ["x"]}), ref, atol=1e-5)


def test_layer_is_shared_by_model_clones():
    """ComfyUI deep-copies model_options on clone; the layer's factors must not be copied each time."""
    import copy

    layer = GreenKVLayer(KVDeltas(k=(factorize(torch.ones(8, 8)),)))
    options = {"transformer_options": {"patches_replace": {"attn2": {("input", 1, 0): layer}}}}
    assert copy.deepcopy(options)["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)] is layer
