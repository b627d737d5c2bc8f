"""Green-token key/value protection of a LoRA (plain torch).

In a cross-attention layer every text token t reaches the image through its key and value,
k_t = (W_k + D_k) c_t and v_t = (W_v + D_v) c_t, where c_t is the token's context vector, W the base
weights and D a LoRA's delta. The DiffuMatting UNet decides the green backing through the attention of
the "green" token, so a style LoRA that changes what the layer makes of that token can repaint the
backing. The protection here removes (a fraction `amount` of) D c_g from the keys and values at the green
token positions g only, while the layer runs:

    k_g <- k_g - amount * D_k c_g,   v_g <- v_g - amount * D_v c_g,   k_t, v_t unchanged for t not in g.

With amount 1 the green token's key and value are exactly the base weights' for its context vector, and
every other token's key and value are exactly the LoRA's. No weight-space edit can do both: the context
vectors of a prompt's tokens are far from orthogonal, so removing D along the green direction also moves
every other token (the reason this runs per token, inside the attention).

D is kept as a low-rank factor pair (`factorize`); a LoRA's delta has the LoRA's rank, so this is small
even for SDXL's 140 key/value projections. The per-call data (which positions hold "green" in which
prompt, and their context vectors) arrives in the block's options under OPTION_KEY (`GreenContext`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPTION_KEY = "diffumatting_green_kv"


@dataclass(frozen=True)
class LowRank:
    """A matrix (out, in) as up (out, r) @ down (r, in)."""

    up: torch.Tensor
    down: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x @ (up @ down)^T (..., out), in x's dtype."""
        return (x @ self.down.to(x).T) @ self.up.to(x).T

    def scaled(self, factor: float) -> "LowRank":
        return LowRank(self.up * float(factor), self.down)

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


def factorize(delta: torch.Tensor, rtol: float = 1e-5, start_rank: int = 16) -> LowRank:
    """`delta` (out, in) as a LowRank that reproduces it to `rtol` relative Frobenius error (float32).

    A randomized range finder with a doubling width, each result checked against the dense delta; a
    delta of full rank is kept dense (up = delta, down = identity) on its smaller side.
    """
    if delta.ndim != 2:
        raise ValueError(f"a key/value delta must be a matrix (out, in), got shape {tuple(delta.shape)}")
    d = delta.detach().float()
    out, inp = d.shape
    norm = float(torch.linalg.matrix_norm(d))
    if norm == 0.0:
        return LowRank(d.new_zeros(out, 0), d.new_zeros(0, inp))
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = max(1, int(start_rank))
    while q < min(out, inp):
        probe = torch.randn(inp, q, generator=gen).to(d)
        basis, _ = torch.linalg.qr(d @ probe)
        down = basis.T @ d
        if float(torch.linalg.matrix_norm(d - basis @ down)) <= rtol * norm:
            return LowRank(basis.contiguous(), down.contiguous())
        q *= 2
    if out <= inp:
        return LowRank(torch.eye(out, dtype=d.dtype, device=d.device), d.clone())
    return LowRank(d.clone(), torch.eye(inp, dtype=d.dtype, device=d.device))


@dataclass(frozen=True)
class GreenContext:
    """One prompt's green tokens: positions (G,) in its context of `length` tokens and their context
    vectors (B, G, ctx) (B: the prompt's batch, usually 1)."""

    positions: torch.Tensor
    vectors: torch.Tensor
    length: int


def green_context(context: torch.Tensor, positions: Sequence[int]) -> GreenContext:
    """GreenContext of a conditioning tensor (B, T, ctx) and the green token positions in it."""
    if context.ndim != 3:
        raise ValueError(f"a cross-attention context is (batch, tokens, channels), got shape {tuple(context.shape)}")
    t = int(context.shape[1])
    pos = sorted({int(p) for p in positions})
    bad = [p for p in pos if not 0 <= p < t]
    if bad:
        raise ValueError(f"green token positions {bad} are outside the prompt's {t} tokens: the conditioning was "
                         "changed after Green Canvas Prompt recorded them; encode the prompt again")
    index = torch.tensor(pos, dtype=torch.long)
    return GreenContext(index, context[:, index].detach(), t)


@dataclass(frozen=True)
class KVDeltas:
    """The deltas to remove at the green positions of one attention layer (each already scaled)."""

    k: tuple[LowRank, ...] = ()
    v: tuple[LowRank, ...] = ()

    def plus(self, other: "KVDeltas") -> "KVDeltas":
        return KVDeltas(self.k + other.k, self.v + other.v)


def _rows(green: GreenContext, rows: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, vectors (rows, P, ctx)) for a batch chunk of `rows` whose context was repeated along the
    tokens to `tokens` (core pads prompts of different lengths by repeating them)."""
    if tokens % green.length:
        raise ValueError(f"the attention has {tokens} context tokens, the prompt had {green.length}: not a "
                         "repetition of it, so the green positions cannot be placed")
    reps = tokens // green.length
    pos = torch.cat([green.positions + r * green.length for r in range(reps)])
    vec = green.vectors
    if vec.shape[0] != rows:
        vec = vec.repeat((rows + vec.shape[0] - 1) // vec.shape[0], 1, 1)[:rows]
    return pos, vec.repeat(1, reps, 1)


def remove_green_deltas(k: torch.Tensor, v: torch.Tensor, deltas: KVDeltas, table: Mapping,
                        chunk_ids: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, T, inner) with the deltas' action on the green tokens removed.

    The batch is len(chunk_ids) equal chunks in order; `table` maps a chunk id to its GreenContext
    (a chunk without an entry has no green token)."""
    n = len(chunk_ids)
    if n == 0 or k.shape[0] % n:
        raise ValueError(f"a batch of {k.shape[0]} cannot be split into {n} prompts")
    per = k.shape[0] // n
    k_out, v_out = k, v
    for i, cid in enumerate(chunk_ids):
        green = table.get(cid)
        if green is None or green.positions.numel() == 0:
            continue
        if k_out is k:
            k_out, v_out = k.clone(), v.clone()
        pos, vec = _rows(green, per, k.shape[1])
        pos = pos.to(k.device)
        vec = vec.to(device=k.device, dtype=torch.float32)
        rows = slice(i * per, (i + 1) * per)
        for target, parts in ((k_out, deltas.k), (v_out, deltas.v)):
            if parts:
                change = sum(p.apply(vec) for p in parts)
                target[rows, pos] -= change.to(target.dtype)
    return k_out, v_out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of q (B, N, inner) over k, v (B, T, inner): softmax(q k^T / sqrt(d)) v."""
    b, n, inner = q.shape
    d = inner // heads
    if k.shape[0] != b:
        k, v = k.expand(b, -1, -1), v.expand(b, -1, -1)
    t = k.shape[1]
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, t, heads, d).transpose(1, 2)
    vh = v.reshape(b, t, heads, d).transpose(1, 2)
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, inner)


class GreenKVLayer:
    """An attn2 replacement (ComfyUI's `(q, k, v, extra_options) -> out` signature) for one layer: removes
    `deltas` at the green positions, then attends. Without green data in the options it is plain attention."""

    def __init__(self, deltas: KVDeltas):
        self.deltas = deltas

    def __deepcopy__(self, memo):
        """Shared, not copied: the layer and its deltas are never changed in place (a new layer replaces
        it), and ComfyUI deep-copies a MODEL's options on every clone (SDXL: up to hundreds of MB)."""
        return self

    def correct(self, k: torch.Tensor, v: torch.Tensor, extra_options: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        table = extra_options.get(OPTION_KEY)
        if not table:
            return k, v
        return remove_green_deltas(k, v, self.deltas, table, list(extra_options.get("uuids") or []))

    def __call__(self, q, k, v, extra_options):
        k, v = self.correct(k, v, extra_options)
        return attend(q, k, v, int(extra_options["n_heads"]))
