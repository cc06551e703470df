"""DeepSeek Sparse Attention, the whole algorithm in plain PyTorch.

Read top to bottom: lightning indexer -> causal top-k -> sparse MLA attention in the absorbed
(MQA) form -> the indexer's KL objectives. Every Triton kernel in ``megatron_dsa.kernels`` is
tested against the function of the same name here. Nothing here knows about megatron-core:
plain tensors in, plain tensors out.

Shapes (batch first):
    B batch, Sq queries, Sk keys, H attention heads, Dqk = kv_lora_rank + rope dims (576 in
    the 671B model), Dv = kv_lora_rank (512), HI indexer heads, DI indexer head dim, K top-k.

Positions: queries and keys carry absolute token positions (``q_pos`` [Sq], ``k_pos`` [Sk]).
Key s is eligible for query t iff ``k_pos[s] <= q_pos[t]``. They default to 0..S-1; context
parallel and decoding pass their own. Returned top-k indices index the key dimension.

The selection is one contract everywhere (reference, kernels, TP / CP, decoding): [B, Sq, K]
(decoding: [B, K]) int32, -1 padded. Positions stay below 2^31; int32 halves the tensor the
sparse attention and the sparse KL keep for their backward (2 GiB a layer at 128K x 2048 in
int64). Ops that need int64 indices (``torch.gather``) convert a chunk locally.

Packed sequences (several documents in one sequence) add document ids (``q_doc`` [Sq],
``k_doc`` [Sk], ``document_ids``): key s is eligible for query t iff it is in the same document
AND ``k_pos[s] <= q_pos[t]``. That one rule is the only place documents enter: the top-k
selects inside the query's document, so the sparse attention and the sparse KL (which read only
the selected indices) follow it, and a document shorter than top-k attends densely to itself.

Memory never grows as S^2 for the whole sequence: every function that would build a
[Sq, Sk] matrix walks over query chunks, and under autograd each chunk is checkpointed so its
probabilities are recomputed in backward instead of kept.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Upper bound on elements of one chunk's [chunk, H, Sk] (or [chunk, K, D]) intermediate.
CHUNK_ELEMENTS = 1 << 24


def _up(x: torch.Tensor) -> torch.Tensor:
    """Accumulate in at least fp32 (bf16/fp16 inputs are upcast; fp64 stays fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# Below this a distribution entry contributes nothing to a KL (0 * log 0 = 0).
KL_EPS = 1e-30


# --------------------------------------------------------------------------------------------
# Building blocks of the lightning indexer
# --------------------------------------------------------------------------------------------


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard rotation of the last dim (a power of two): ``x @ H / sqrt(d)``.

    Sylvester ordering, the same matrix as ``fast_hadamard_transform(x, scale=d**-0.5)``.
    Exact dot products are unchanged (H is orthonormal); it spreads outliers before FP8.
    One matmul with the +-1 matrix (exact in any float type) rather than log2(d) butterfly
    passes: fewer operators, one pass over x.
    """
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two last dim, got {d}")
    return (x @ _hadamard_matrix(d, x.dtype, x.device)) * d**-0.5


@functools.lru_cache(maxsize=32)
def _hadamard_matrix(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sylvester's H_d (entries +-1): H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


@dataclass(frozen=True)
class YaRN:
    """YaRN RoPE scaling (DeepSeek-V3's: factor 40 over 4096 original positions, mscale 1, 1).

    The frequencies: dims that rotate fewer than ``beta_slow`` times over the original context
    are interpolated (divided by ``factor``), dims that rotate more than ``beta_fast`` times
    keep theirs, with a linear ramp between. cos and sin are multiplied by
    ``attention_factor``; MLA's softmax scale by ``softmax_factor`` (megatron-core's and
    transformers' conventions, which agree).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @staticmethod
    def _mscale(factor: float, mscale: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    @property
    def attention_factor(self) -> float:
        return self._mscale(self.factor, self.mscale) / self._mscale(self.factor, self.mscale_all_dim)

    @property
    def softmax_factor(self) -> float:
        return self._mscale(self.factor, self.mscale_all_dim) ** 2


def rope_inv_freq(rope_dim: int, base: float = 10000.0, yarn: Optional[YaRN] = None,
                  device=None) -> torch.Tensor:
    """The rotation frequencies [rope_dim // 2]: base^(-2i/rope_dim), YaRN-scaled when given
    (computed in float32, as megatron-core's and transformers' tables are)."""
    pos_freqs = base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim)
    if yarn is None:
        return 1.0 / pos_freqs

    def dim_of(rotations: float) -> float:  # the dim that turns ``rotations`` times over the original context
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of(yarn.beta_fast)), 0)
    high = min(math.ceil(dim_of(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: the original frequency (fast dims), 0: interpolated
    return 1.0 / (yarn.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


def rope_cos_sin(
    positions: torch.Tensor,
    rope_dim: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    yarn: Optional[YaRN] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [len(positions), rope_dim // 2] for frequencies base^(-2i/rope_dim),
    YaRN-scaled (frequencies and ``attention_factor``) when ``yarn`` is given."""
    if yarn is None:
        inv_freq = base ** (
            -torch.arange(0, rope_dim, 2, dtype=torch.float64, device=positions.device) / rope_dim
        )
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)
    angles = positions.float()[:, None] * rope_inv_freq(rope_dim, base, yarn, positions.device)[None, :]
    factor = yarn.attention_factor
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def apply_rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved ("half-split") RoPE on the FIRST ``2 * cos.shape[-1]`` dims of x.

    The indexer's layout is [rope | nope]; dims i and i + rope_dim/2 form a rotating pair.
    (The interleaved form, pairs (2i, 2i+1), silently hurts long-context retrieval.)
    x: [B, S, ..., D]; cos/sin: [S, rope_dim // 2].
    """
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    # Broadcast [S, half] over the dims between S and the last one.
    shape = [1, cos.shape[0]] + [1] * (x.dim() - 3) + [half]
    c, s = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)


def indexer_qkw(
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    w_proj: torch.Tensor,
    k_norm_weight: torch.Tensor,
    k_norm_bias: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    eps: float = 1e-6,
    rotate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indexer queries, keys and head weights from the outputs of its three linear layers.

    q_proj = wq_b(qr)          [B, S, HI * DI]  (qr: MLA's normalised query latent)
    k_proj = wk(x)             [B, S, DI]       (x: the attention input)
    w_proj = weights_proj(x)   [B, S, HI]
    Returns q [B, S, HI, DI], k [B, S, DI] (one key per token, shared by all heads) and
    w [B, S, HI], all fp32, with ``w`` already scaled by HI^-0.5 * DI^-0.5.

    ``rotate`` (default: when DI is a power of two) applies the Hadamard rotation to q and k.
    It leaves the scores unchanged up to rounding, so a DI that is not a power of two (which
    Hugging Face's model accepts) scores unrotated; only the FP8 indexer needs the rotation.
    """
    head_dim = k_proj.shape[-1]
    if rotate is None:
        rotate = head_dim & (head_dim - 1) == 0
    q = _up(q_proj).unflatten(-1, (n_heads, head_dim))
    # The key LayerNorm (weight and bias) runs in fp32.
    k = F.layer_norm(_up(k_proj), (head_dim,), _up(k_norm_weight), _up(k_norm_bias), eps)
    q = apply_rope_half_split(q, cos, sin)
    k = apply_rope_half_split(k, cos, sin)
    if rotate:
        q, k = hadamard_transform(q), hadamard_transform(k)
    w = _up(w_proj) * (n_heads**-0.5 * head_dim**-0.5)
    return q, k, w


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = sum_j w[b, t, j] * ReLU(q[b, t, j] . k[b, s]), fp32, no mask. [B, Sq, Sk]."""
    dots = torch.einsum("btjd,bsd->btjs", _up(q), _up(k))
    return (dots.relu() * _up(w)[..., None]).sum(dim=2)


# --------------------------------------------------------------------------------------------
# Causal top-k selection
# --------------------------------------------------------------------------------------------


def _positions(pos: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device) if pos is None else pos.to(device)


def _documents(doc: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    """Document ids; None = one document (an unpacked sequence)."""
    return torch.zeros(n, dtype=torch.long, device=device) if doc is None else doc.to(device)


def document_ids(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Document id of every row [seq_len] of a packed sequence from its document boundaries
    (megatron's ``cu_seqlens``: [0, end of doc 0, end of doc 1, ..., seq_len])."""
    cu = cu_seqlens.to(torch.long)
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"document boundaries must rise from 0 to the sequence length {seq_len}, got {cu.tolist()}")
    rows = torch.arange(seq_len, device=cu.device)
    return torch.searchsorted(cu[1:], rows, right=True)


def causal_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[Sq, Sk] bool, True where key s may be attended by query t: k_pos[s] <= q_pos[t] and, in a
    packed sequence, the same document (q_doc[t] == k_doc[s])."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if q_doc is not None or k_doc is not None:
        q_doc = _documents(q_doc, q_pos.shape[0], q_pos.device)
        k_doc = _documents(k_doc, k_pos.shape[0], k_pos.device)
        mask = mask & (k_doc[None, :] == q_doc[:, None])
    return mask


def _chunk_size(per_row: int, total_rows: int) -> int:
    return max(1, min(total_rows, CHUNK_ELEMENTS // max(per_row, 1)))


def topk_from_scores(scores: torch.Tensor, mask: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k key indices of masked scores [..., Sq, Sk], int32; -1 fills slots past the eligible
    count.

    Ties are broken towards the smaller key index (stable sort), so every rank and every kernel
    that follows this rule selects the same set. Order within a row: score descending.
    """
    masked = scores.masked_fill(~mask, float("-inf"))
    k = min(topk, scores.shape[-1])
    values, idx = torch.sort(masked, dim=-1, descending=True, stable=True)
    # int32: the selection's one dtype (positions stay below 2^31).
    values, idx = values[..., :k], idx[..., :k].to(torch.int32)
    idx = idx.masked_fill(values == float("-inf"), -1)
    if k < topk:
        idx = F.pad(idx, (0, topk - k), value=-1)
    return idx


@torch.no_grad()
def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal top-k of the indexer scores: [B, Sq, topk] int32, -1 padded.

    Row t keeps ``min(topk, #eligible keys)`` entries (``q_doc``/``k_doc``: only keys of its
    own document are eligible). Scores are built per query chunk.
    """
    B, Sq = q.shape[:2]
    Sk = k.shape[1]
    q_pos, k_pos = _positions(q_pos, Sq, q.device), _positions(k_pos, Sk, q.device)
    q_doc, k_doc = _documents(q_doc, Sq, q.device), _documents(k_doc, Sk, q.device)
    out = torch.empty(B, Sq, topk, dtype=torch.int32, device=q.device)
    step = _chunk_size(B * q.shape[2] * Sk, Sq)
    for t0 in range(0, Sq, step):
        t1 = min(Sq, t0 + step)
        scores = indexer_scores(q[:, t0:t1], k, w[:, t0:t1])
        out[:, t0:t1] = topk_from_scores(scores, causal_mask(q_pos[t0:t1], k_pos, q_doc[t0:t1], k_doc), topk)
    return out


# A selection kept for a backward in half its bytes: keys in blocks of 2^16, the low 16 bits of
# each key (int16) and, per row, how many of its slots hold keys below the end of each block.
# Exact for rows that list their keys in ascending order with the -1 padding last (what the
# indexer's unordered top-k returns); nothing shorter is exact for the others.
SELECTION_KEY_BLOCK_BITS = 16


def selection_key_blocks(n_keys: int) -> int:
    """The blocks of 2^16 keys that keys below ``n_keys`` fall in (at least one)."""
    return max(1, -(-int(n_keys) >> SELECTION_KEY_BLOCK_BITS))


@torch.no_grad()
def compact_selection(idx: torch.Tensor, n_keys: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``idx`` [B, S, K] int32 (keys < ``n_keys``) as (low [B, S, K] int16, ends [B, S, blocks]
    int32), or None when a row is not in ascending key order with the padding last, or holds a
    key outside [0, blocks x 2^16). One host sync for that check."""
    B, S, K = idx.shape
    if K == 0 or idx.numel() == 0:
        return None
    blocks = selection_key_blocks(n_keys)
    idx = idx.contiguous()
    low = idx.to(torch.int16)  # two's-complement truncation: each key's low half
    ends = torch.empty(B, S, blocks, dtype=torch.int32, device=idx.device)
    ok = torch.ones((), dtype=torch.bool, device=idx.device)
    step = _chunk_size(B * K, S)
    for t0 in range(0, S, step):
        part = idx[:, t0:t0 + step]
        cur, nxt = part[..., :-1], part[..., 1:]
        ok &= ((nxt == -1) | ((cur >= 0) & (nxt > cur))).all() & (part >= -1).all()
        for j in range(blocks):
            below = (part >= 0) & (part < (j + 1) << SELECTION_KEY_BLOCK_BITS)
            ends[:, t0:t0 + step, j] = below.sum(-1, dtype=torch.int32)
        ok &= (ends[:, t0:t0 + step, -1] == (part >= 0).sum(-1, dtype=torch.int32)).all()
    return (low, ends) if bool(ok) else None


def expand_selection(low: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The int32 selection ``compact_selection`` stored as (low, ends)."""
    out = low.to(torch.int32).bitwise_and_(0xFFFF)
    slot = torch.arange(low.shape[-1], dtype=torch.int32, device=low.device)
    for j in range(ends.shape[-1] - 1):  # a slot past block j's keys holds a later block's key
        out += (slot >= ends[..., j:j + 1]).to(torch.int32) << SELECTION_KEY_BLOCK_BITS
    return out.masked_fill_(slot >= ends[..., -1:], -1)


# --------------------------------------------------------------------------------------------
# MLA attention in the absorbed (MQA) form: one latent KV entry per token, shared by all heads
# --------------------------------------------------------------------------------------------


def _map_query_chunks(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    per_query: tuple[torch.Tensor, ...],
    shared: tuple,
    step: int,
) -> list[torch.Tensor]:
    """Apply fn(*per_query[:, chunk], *shared) over query chunks and concatenate along dim 1.

    Under autograd each chunk is checkpointed: backward recomputes that chunk's [chunk, Sk]
    intermediates instead of keeping S^2 activations for the whole sequence.
    """
    Sq = per_query[0].shape[1]
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in per_query + shared if isinstance(t, torch.Tensor)
    )
    pieces = []
    for t0 in range(0, Sq, step):
        args = tuple(t[:, t0 : t0 + step] for t in per_query) + shared
        if grad and Sq > step:
            pieces.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            pieces.append(fn(*args))
    return [torch.cat(parts, dim=1) for parts in zip(*pieces)]


def _attend(scores: torch.Tensor, values: torch.Tensor, einsum: str):
    """Softmax over the last dim of fp32 scores with an all-masked-row guard; returns (out, lse)."""
    lse = torch.logsumexp(scores, dim=-1)
    # Fully masked rows (lse = -inf) get zero output and lse = -inf, never NaN.
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse[..., None])
    out = torch.einsum(einsum, probs, _up(values))
    return out, lse


def dense_mla_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    v_dim: int,
    scale: float,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    need_lse: bool = True,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal attention of absorbed queries over latent KV entries (``q_doc``/``k_doc``: within
    each query's document only).

    q [B, Sq, H, Dqk], kv [B, Sk, Dqk] (values are kv[..., :v_dim]).
    Returns out [B, Sq, H, v_dim] in q's dtype and the log-sum-exp [B, Sq, H] in fp32
    (None when ``need_lse`` is False: backends that get it only by an extra pass skip it).
    """
    # One key / value head that every query head shares (MQA): ``dense_attention`` broadcasts it.
    return dense_attention(q, kv[:, :, None], kv[:, :, None, :v_dim], scale, q_pos=q_pos, k_pos=k_pos,
                           need_lse=need_lse, q_doc=q_doc, k_doc=k_doc)


# MLA's MHA form. The absorbed form above shares one latent entry [L + R] among all heads, which
# decoding and sparse attention need (a gathered row serves every head). Dense attention over
# every key is cheaper per head in the MHA form: the latent expanded by the K and V
# up-projections into per-head keys [dk + R] and values [dv] (DeepSeek-V3.2's 192 / 128
# against 576 / 512), the same scores and outputs by associativity.


def mha_form(q: torch.Tensor, kv: torch.Tensor, k_up: torch.Tensor, v_up: torch.Tensor):
    """Unabsorbed queries and latent entries in MLA's MHA form.

    q [B, Sq, H, L + R] holds each head's q_nope in its first dk columns and its rope part in
    the last R (what the layer's attention hands the core in the dense phases), kv [B, Sk, L + R]
    the latent entries, k_up [H, dk, L] and v_up [H, dv, L] the up-projections. Returns
    q [B, Sq, H, dk + R], k [B, Sk, H, dk + R] = [W_UK c, k_rope] and v [B, Sk, H, dv] = W_UV c.
    """
    H, dk, L = k_up.shape
    if q.shape[-1] != kv.shape[-1] or kv.shape[-1] <= L or q.shape[2] != H or v_up.shape[::2] != (H, L):
        raise ValueError(f"MHA form: q {tuple(q.shape)}, kv {tuple(kv.shape)}, k_up {tuple(k_up.shape)}, "
                         f"v_up {tuple(v_up.shape)} do not fit together")
    v = torch.einsum("bsl,hdl->bshd", kv[..., :L], v_up)
    return torch.cat((q[..., :dk], q[..., L:]), dim=-1), mha_keys(kv, k_up), v


def mha_keys(kv: torch.Tensor, k_up: torch.Tensor) -> torch.Tensor:
    """Each head's keys in MLA's MHA form: kv [B, Sk, L + R] latent entries, k_up [H, dk, L]
    -> [B, Sk, H, dk + R] = [W_UK c, k_rope] (the rope part is every head's)."""
    H, dk, L = k_up.shape
    c, k_rope = kv[..., :L], kv[..., L:]
    return torch.cat((torch.einsum("bsl,hdl->bshd", c, k_up), k_rope[:, :, None].expand(-1, -1, H, -1)), dim=-1)


def absorb_query(q: torch.Tensor, k_up: torch.Tensor) -> torch.Tensor:
    """The absorbed queries [B, Sq, H, L + R] of ``mha_form``'s input q: q_nope W_UK and the rope part."""
    H, dk, L = k_up.shape
    return torch.cat((torch.einsum("bthd,hdl->bthl", q[..., :dk], k_up), q[..., L:]), dim=-1)


def _dense_mha_chunk(q, q_pos, q_doc, k, v, k_pos, k_doc, scale: float):
    scores = main_scores(q, k) * scale
    scores = scores.masked_fill(~causal_mask(q_pos, k_pos, q_doc, k_doc)[None, :, None, :], float("-inf"))
    out, lse = _attend(scores, v, "bths,bshd->bthd")
    return out.to(q.dtype), lse


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    need_lse: bool = True,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal attention with per-head keys and values (``mha_form``; one head of them, shared by
    every query head, for ``dense_mla_attention``), within each query's document for ``q_doc`` /
    ``k_doc``: q [B, Sq, H, Dqk], k [B, Sk, H or 1, Dqk], v [B, Sk, H or 1, Dv] ->
    (out [B, Sq, H, Dv] in q's dtype, lse [B, Sq, H] fp32 or None)."""
    B, Sq, H = q.shape[:3]
    Sk = k.shape[1]
    q_pos, k_pos = _positions(q_pos, Sq, q.device), _positions(k_pos, Sk, q.device)
    q_doc, k_doc = _documents(q_doc, Sq, q.device), _documents(k_doc, Sk, q.device)
    step = _chunk_size(B * H * Sk, Sq)
    fn = lambda q_, qp, qd, k_, v_, kp, kd: _dense_mha_chunk(q_, qp[0], qd[0], k_, v_, kp, kd, scale)  # noqa: E731
    out, lse = _map_query_chunks(fn, (q, q_pos[None], q_doc[None]), (k, v, k_pos, k_doc), step)
    return out, (lse if need_lse else None)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, Sk, D], idx [B, Sq, K] (-1 allowed) -> [B, Sq, K, D]; -1 slots read token 0."""
    B, Sq, K = idx.shape
    # int64 for torch.gather, a chunk's copy only: the selection itself stays int32.
    flat = idx.clamp_min(0).long().reshape(B, Sq * K, 1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, flat).view(B, Sq, K, x.shape[-1])


def _sparse_chunk(q, idx, kv, v_dim: int, scale: float):
    sel = gather_tokens(kv, idx)  # [B, c, K, Dqk]
    scores = torch.einsum("bthd,btkd->bthk", _up(q), _up(sel)) * scale
    scores = scores.masked_fill((idx < 0)[:, :, None, :], float("-inf"))
    out, lse = _attend(scores, sel[..., :v_dim], "bthk,btkd->bthd")
    return out.to(q.dtype), lse


def sparse_mla_attention(
    q: torch.Tensor, kv: torch.Tensor, topk_idx: torch.Tensor, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of absorbed queries over the selected latent KV entries only.

    q [B, Sq, H, Dqk], kv [B, Sk, Dqk], topk_idx [B, Sq, K] int32 (-1 = unused slot, skipped).
    Equals dense attention with every non-selected key masked out. Returns out [B, Sq, H, v_dim]
    and lse [B, Sq, H]; a row with no selected key gives zeros and lse = -inf, never NaN.
    """
    B, Sq, H, D = q.shape
    K = topk_idx.shape[-1]
    step = _chunk_size(B * K * max(H, D), Sq)
    fn = lambda q_, i_, kv_: _sparse_chunk(q_, i_, kv_, v_dim, scale)  # noqa: E731
    out, lse = _map_query_chunks(fn, (q, topk_idx), (kv,), step)
    return out, lse


def sparse_mla_attention_backward(
    q: torch.Tensor, kv: torch.Tensor, topk_idx: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, v_dim: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse attention's backward for the output gradient ``dout``, and the probabilities
    it recomputes summed over the heads: (dq, dkv, ``sparse_target_head_sum`` [B, Sq, K] fp32).

    The sparse KL's target is that head sum, so the training step takes it here instead of
    from a second pass over the selected rows. ``out`` and ``lse`` are the forward's (the
    kernels read them; the reference recomputes).
    """
    with torch.enable_grad():
        q_, kv_ = q.detach().requires_grad_(), kv.detach().requires_grad_()
        o, _ = sparse_mla_attention(q_, kv_, topk_idx, v_dim, scale)
        dq, dkv = torch.autograd.grad(o, (q_, kv_), dout)
    return dq, dkv, sparse_target_head_sum(q, kv, topk_idx, scale)


# --------------------------------------------------------------------------------------------
# Training the indexer: KL(p || softmax(I)) against the head-summed attention distribution
# --------------------------------------------------------------------------------------------
#
# Detach rules (the caller's job, documented here because the math depends on them):
#   * the target p is built from DETACHED main-attention queries and keys;
#   * the indexer's inputs (x, qr) are detached, so the KL trains only the indexer's own
#     parameters and the language-model loss never reaches the indexer (top-k indices carry
#     no gradient anyway).
# The gradient of each row's KL w.r.t. the indexer logits is softmax(I) - p over the same set.
#
# The KL is the report's objective and the default. Alternatives (``objective=`` of
# dense_indexer_kl / sparse_indexer_kl, ``mdsa_indexer_objective`` in the config) are one small
# per-row function each, below kl_rows: ``(p, logits, mask) -> loss per row``, with
# q = softmax(logits) over the mask. Only "kl" has Triton kernels.


def kl_rows(p: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || softmax(logits)) over the entries where mask is True.

    p must be a distribution over the masked entries (zero elsewhere). Rows with no entry
    give 0. Returns [...] (the last dim reduced).
    """
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    log_q = (logits - lse).masked_fill(~mask, 0.0)
    log_p = torch.log(p.clamp_min(KL_EPS))
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) over the mask; 0 outside it and on rows with no entry (never NaN)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (logits - lse).masked_fill(~mask, 0.0)


def reverse_kl_rows(p: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(logits) || p) = sum_s q_s (log q_s - log p_s) over the mask.

    Mode-seeking: it punishes indexer mass on keys the attention ignores. log p is clamped at
    KL_EPS, so a target entry that underflowed to 0 costs a large finite penalty, not inf.
    Gradient w.r.t. logit j: q_j * (log q_j - log p_j - loss). Rows with no entry give 0.
    """
    log_q = _masked_log_softmax(logits, mask)
    q = torch.exp(log_q) * mask
    log_p = torch.log(p.clamp_min(KL_EPS))
    return torch.where(mask, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1)


def mse_rows(p: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum over the mask of (softmax(logits)_s - p_s)^2.

    Gradient w.r.t. logit j: 2 q_j * ((q_j - p_j) - sum_s q_s (q_s - p_s)). It vanishes as
    q_j -> 0, so (unlike the KL) it barely pushes up keys the indexer currently ignores.
    """
    q = torch.exp(_masked_log_softmax(logits, mask)) * mask
    return ((q - p) * mask).square().sum(dim=-1)


def listwise_rows(
    p: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, topk: Optional[int] = None
) -> torch.Tensor:
    """Ranking objective: cross-entropy of the attention's own top-k against the indexer.

    T = the top ``min(topk, #eligible)`` keys of p inside the mask (ties towards the smaller
    key index, as ``topk_from_scores``); ``topk=None`` takes T = the whole mask. The target
    q_T = p / sum_T p on T (0 elsewhere) and

        loss = -sum_{s in T} q_T[s] * log softmax_mask(logits)[s],

    i.e. the indexer distribution stays over ALL eligible keys, so mass it puts outside the
    attention's top-k is penalised. Gradient w.r.t. the logits: softmax(logits) - q_T over the
    mask. With T = the mask (the sparse phase, where the mask IS the selected set and p is
    already renormalised over it) q_T = p and this equals KL(p || softmax(logits)) + H(p): the
    KL up to a constant (the target's entropy), with the same gradient.
    """
    if topk is not None:
        sel = topk_from_scores(p, mask, topk)
        # Unused (-1) slots land in an extra last column, dropped after the scatter.
        n = p.shape[-1]
        in_t = torch.zeros(*p.shape[:-1], n + 1, dtype=torch.bool, device=p.device)
        in_t = in_t.scatter_(-1, torch.where(sel < 0, n, sel).long(), True)[..., :n]
        target = p * in_t
        target = target / target.sum(dim=-1, keepdim=True).clamp_min(KL_EPS)
    else:
        target = p * mask
    log_q = _masked_log_softmax(logits, mask)
    return torch.where(target > 0, -target * log_q, torch.zeros_like(target)).sum(dim=-1)


# objective name -> per-row loss (p, logits, mask) -> [...]; listwise also takes topk.
INDEXER_OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "kl": kl_rows,
    "reverse_kl": reverse_kl_rows,
    "mse": mse_rows,
    "listwise": listwise_rows,
}


def objective_rows(objective: str, topk: Optional[int] = None) -> Callable[..., torch.Tensor]:
    """The per-row loss function ``(p, logits, mask) -> [...]`` of a named objective.

    ``topk`` is the size of the listwise target set T (None: the whole mask); the other
    objectives ignore it. Unknown names raise ValueError.
    """
    if objective not in INDEXER_OBJECTIVES:
        raise ValueError(f"unknown indexer objective {objective!r}; one of {tuple(INDEXER_OBJECTIVES)}")
    fn = INDEXER_OBJECTIVES[objective]
    if objective == "listwise":
        return lambda p, logits, mask: listwise_rows(p, logits, mask, topk=topk)
    return fn


def main_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The main attention's unscaled scores [B, Sq, H, Sk] (fp32 on CPU) of q [B, Sq, H, D]
    over ``keys``: [B, Sk, D], one row every head reads (MLA's absorbed latent), or
    [B, Sk, H, D], each head's own (MLA's MHA form, ``mha_keys``)."""
    return torch.einsum("bthd,bsd->bths" if keys.dim() == 3 else "bthd,bshd->bths", _up(q), _up(keys))


def check_main_keys(q_main: torch.Tensor, kv: torch.Tensor) -> None:
    """``main_scores``'s two key layouts, checked against the queries before any compute."""
    B, _, H, D = q_main.shape
    heads_ok = kv.dim() == 3 or (kv.dim() == 4 and kv.shape[2] == H)
    if not heads_ok or kv.shape[0] != B or kv.shape[-1] != D:
        raise ValueError(f"the main attention's keys {tuple(kv.shape)} fit neither [B, Sk, D] nor [B, Sk, H, D] "
                         f"for queries {tuple(q_main.shape)}")


def normalised_rows(weights: torch.Tensor) -> torch.Tensor:
    """Non-negative weights divided by their sum over the last dim (rows of 0 stay 0)."""
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(KL_EPS)


def head_summed_target(probs: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Sum attention probabilities over heads, then L1-normalise over keys (the target p)."""
    return normalised_rows(probs.sum(dim=dim))


def _dense_kl_chunk(
    q_main, q_pos, q_doc, kv, k_pos, k_doc, q_idx, w_idx, k_idx, scale: float, topk: int, objective: str = "kl"
):
    mask = causal_mask(q_pos[0], k_pos, q_doc[0], k_doc)[None]  # [1, c, Sk]
    with torch.no_grad():
        scores = main_scores(q_main, kv) * scale
        probs = torch.softmax(scores.masked_fill(~mask[:, :, None], float("-inf")), dim=-1)
        p = head_summed_target(probs.nan_to_num_(0.0))
    logits = indexer_scores(q_idx, k_idx, w_idx)
    kl = objective_rows(objective, topk)(p, logits, mask)
    with torch.no_grad():
        sel = topk_from_scores(logits.detach(), mask, topk)
        recall = (torch.gather(p, -1, sel.clamp_min(0).long()) * (sel >= 0)).sum(-1)
    return kl, recall


def dense_indexer_kl(
    q_main: torch.Tensor,
    kv: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w_idx: torch.Tensor,
    scale: float,
    topk: int,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    objective: str = "kl",
    recall_rows: Optional[torch.Tensor] = None,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm-up objective: per-query KL(p || softmax(I)) over all eligible keys (``q_doc`` /
    ``k_doc``: those of the query's own document).

    p: the main attention's probabilities (q_main over kv, causal) summed over ALL heads and
    L1-normalised; never differentiated. ``kv``: the latent [B, Sk, D] every head reads
    (absorbed queries), or each head's keys [B, Sk, H, D] (MLA's MHA form: 192 dims a head
    against 576 at DeepSeek-V3.2's shape, the same scores in 3x fewer products). Gradients
    flow into q_idx, k_idx, w_idx only.
    Returns (kl [B, Sq], recall [B, Sq]) where recall is the share of p's mass that the
    indexer's own top-k captures (a diagnostic, no gradient); with ``recall_rows`` (query row
    numbers, see ``recall_sample_rows``) recall is [B, len(recall_rows)] for those rows only.

    ``objective`` swaps the per-row loss (see ``INDEXER_OBJECTIVES``): "kl" (default, the
    report), "reverse_kl", "mse", or "listwise" with T = the top-``topk`` keys of p.
    """
    objective_rows(objective)  # an unknown name fails before any compute
    check_main_keys(q_main, kv)
    B, Sq, H = q_main.shape[:3]
    Sk = kv.shape[1]
    q_pos, k_pos = _positions(q_pos, Sq, q_main.device), _positions(k_pos, Sk, q_main.device)
    q_doc, k_doc = _documents(q_doc, Sq, q_main.device), _documents(k_doc, Sk, q_main.device)
    step = _chunk_size(B * max(H, q_idx.shape[2]) * Sk, Sq)
    fn = lambda qm, qp, qd, qi, wi, kv_, kp, kd, ki: _dense_kl_chunk(  # noqa: E731
        qm, qp, qd, kv_, kp, kd, qi, wi, ki, scale, topk, objective
    )
    kl, recall = _map_query_chunks(
        fn, (q_main.detach(), q_pos[None], q_doc[None], q_idx, w_idx), (kv.detach(), k_pos, k_doc, k_idx), step
    )
    return kl, (recall if recall_rows is None else recall[:, recall_rows])


def recall_sample_rows(seq: int, limit: int, device=None) -> Optional[torch.Tensor]:
    """The query rows the warm-up's top-k recall (a diagnostic) is measured on: at most
    ``limit`` evenly spaced rows ending at the last, longest-context one; None (every row) when
    ``limit`` <= 0 or the sequence has no more rows than that."""
    if limit <= 0 or seq <= limit:
        return None
    stride = -(-seq // limit)
    return torch.arange(seq - 1, -1, -stride, device=device).flip(0)


def _sparse_kl_chunk(q_main, idx, q_idx, w_idx, kv, k_idx, scale: float, objective: str = "kl"):
    valid = idx >= 0
    with torch.no_grad():
        sel = gather_tokens(kv, idx)
        scores = torch.einsum("bthd,btkd->bthk", _up(q_main), _up(sel)) * scale
        probs = torch.softmax(scores.masked_fill(~valid[:, :, None], float("-inf")), dim=-1)
        p = head_summed_target(probs.nan_to_num_(0.0))  # renormalised over the selected set
    k_sel = gather_tokens(k_idx, idx)  # [B, c, K, DI]
    logits = (
        torch.einsum("btjd,btkd->btjk", _up(q_idx), _up(k_sel)).relu() * w_idx[..., None]
    ).sum(dim=2)
    # listwise: T = the selected set itself (topk=None), i.e. the KL plus the target's entropy.
    return (objective_rows(objective)(p, logits, valid),)


def sparse_indexer_kl(
    q_main: torch.Tensor,
    kv: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w_idx: torch.Tensor,
    topk_idx: torch.Tensor,
    scale: float,
    objective: str = "kl",
) -> torch.Tensor:
    """Sparse-phase objective: per-query KL(p[S_t] || softmax(I[S_t])) over the selected set.

    p is renormalised over S_t. Returns kl [B, Sq]; gradients reach q_idx, k_idx, w_idx only.
    ``objective`` swaps the per-row loss over S_t (see ``INDEXER_OBJECTIVES``). For
    "listwise" the target set T is S_t itself, so it equals the KL plus the entropy of p[S_t]
    (a constant for the indexer): same gradient, a different value.
    """
    objective_rows(objective)  # an unknown name fails before any compute
    B, Sq, H = q_main.shape[:3]
    K = topk_idx.shape[-1]
    step = _chunk_size(B * K * max(H, q_idx.shape[2], kv.shape[-1]), Sq)
    fn = lambda qm, i_, qi, wi, kv_, ki: _sparse_kl_chunk(qm, i_, qi, wi, kv_, ki, scale, objective)  # noqa
    (kl,) = _map_query_chunks(
        fn, (q_main.detach(), topk_idx, q_idx, w_idx), (kv.detach(), k_idx), step
    )
    return kl


def sparse_target_head_sum(
    q_main: torch.Tensor, kv: torch.Tensor, topk_idx: torch.Tensor, scale: float, lse: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The main attention's probabilities over each row's selected set, summed over the heads
    of ``q_main``: [B, Sq, K] fp32, no gradient (0 at -1 slots; a head with no valid key adds 0).

    The sparse KL's target before it is normalised: under tensor parallelism each rank sums its
    own heads and the ranks' sums are added. ``lse`` (the sparse attention's, [B, Sq, H]) only
    saves the kernel a pass; the reference recomputes it.
    """
    B, Sq, H = q_main.shape[:3]
    K = topk_idx.shape[-1]
    out = torch.empty(B, Sq, K, dtype=torch.float32, device=q_main.device)
    step = _chunk_size(B * K * max(H, q_main.shape[-1]), Sq)
    with torch.no_grad():
        for t0 in range(0, Sq, step):
            idx = topk_idx[:, t0 : t0 + step]
            scores = torch.einsum("bthd,btkd->bthk", _up(q_main[:, t0 : t0 + step]), _up(gather_tokens(kv, idx))) * scale
            probs = torch.softmax(scores.masked_fill(~(idx >= 0)[:, :, None], float("-inf")), dim=-1)
            out[:, t0 : t0 + step] = probs.nan_to_num_(0.0).sum(dim=2)
    return out


def _kl_from_target_chunk(weights, idx, q_idx, w_idx, k_idx):
    valid = idx >= 0
    k_sel = gather_tokens(k_idx, idx)
    logits = (torch.einsum("btjd,btkd->btjk", _up(q_idx), _up(k_sel)).relu() * w_idx[..., None]).sum(dim=2)
    return (kl_rows(normalised_rows(weights.float().masked_fill(~valid, 0.0)), logits, valid),)


def sparse_indexer_kl_from_target(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w_idx: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """KL(p || softmax(I)) over each row's selected set, p = the given non-negative ``weights``
    [B, Sq, K] divided by their row sum (weights at -1 slots ignored; a row of 0 gives KL 0):
    kl [B, Sq]; gradients reach q_idx, k_idx, w_idx only.

    ``sparse_indexer_kl`` is this with weights = ``sparse_target_head_sum`` (under TP, summed
    over the ranks' heads): the one normalisation is here, where the KL reads the row anyway.
    """
    B, Sq, HI = q_idx.shape[:3]
    K = topk_idx.shape[-1]
    step = _chunk_size(B * K * max(HI, k_idx.shape[-1]), Sq)
    (kl,) = _map_query_chunks(_kl_from_target_chunk, (weights.detach(), topk_idx, q_idx, w_idx), (k_idx,), step)
    return kl


def sparse_indexer_kl_and_grads(
    q_idx: torch.Tensor, k_idx: torch.Tensor, w_idx: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor,
    grad_kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sparse_indexer_kl_from_target``'s kl [B, Sq] and, in the same call, the gradients of
    sum(grad_kl * kl) for q_idx, k_idx and w_idx (``grad_kl``: [B, Sq] or what broadcasts to
    it), for a caller that knows the KL's gradient before its value: the sparse attention's
    backward, which trains the indexer there without building an autograd graph."""
    grad_rows = kl_grad_rows(topk_idx, weights, grad_kl)
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q_idx, k_idx, w_idx)]
        kl = sparse_indexer_kl_from_target(*leaves, topk_idx, weights)
        grads = torch.autograd.grad(kl, leaves, grad_rows)
    return (kl.detach(), *grads)


def kl_grad_rows(topk_idx: torch.Tensor, weights: torch.Tensor, grad_kl: torch.Tensor) -> torch.Tensor:
    """``sparse_indexer_kl_and_grads``' check of its target weights [B, Sq, K] and KL gradient
    (anything that broadcasts to the rows [B, Sq]); the gradient as fp32 rows."""
    B, Sq, K = topk_idx.shape
    try:
        rows_ok = torch.broadcast_shapes(grad_kl.shape, (B, Sq)) == (B, Sq)
    except RuntimeError:
        rows_ok = False
    if weights.shape != (B, Sq, K) or not rows_ok:
        raise ValueError(f"sparse_indexer_kl_and_grads: weights {tuple(weights.shape)} and grad_kl "
                         f"{tuple(grad_kl.shape)} for a selection of {(B, Sq, K)}: want weights {(B, Sq, K)} "
                         f"and a grad_kl that broadcasts to {(B, Sq)}")
    return grad_kl.float().expand(B, Sq)


# --------------------------------------------------------------------------------------------
# Decoding over a paged cache
# --------------------------------------------------------------------------------------------
#
# The cache holds each layer's rows in a pool of fixed-size blocks, [num_blocks, block_size, D];
# sequence b's token s lives in block ``block_table[b, s // block_size]`` at row
# ``s % block_size``. ``lengths[b]`` rows are cached for sequence b; the decoding token of
# sequence b is its last cached row (position ``lengths[b] - 1``) and may see every cached row.
# Indexer keys may be cached in FP8 (e4m3) with one fp32 scale per token: key = k8 * scale.


def paged_rows(pool: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a paged pool [NB, bs, ...] at token ``positions`` [B, N] (-1 allowed: reads the
    sequence's first row) of each sequence of ``block_table`` [B, max_blocks] -> [B, N, ...]."""
    bs = pool.shape[1]
    pos = positions.clamp_min(0).long()
    blocks = torch.gather(block_table.long(), 1, pos // bs)
    return pool[blocks, pos % bs]


# FP8 (e4m3) with one scale per vector, as DeepSeek-V3.2's indexer quantises its queries and keys.
FP8_MAX = 448.0
FP8_AMAX_MIN = 1e-4


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (last dim) e4m3 quantisation of x [B, N, ..., D]: scale = max(amax, 1e-4) *
    (1 / 448). Returns (x8, fp32 scale [B, N, ...]), x ~ x8 * scale.

    The scale multiplies by the fp32 reciprocal rather than dividing: PyTorch divides by a
    scalar that way on CUDA and exactly on the CPU, so a division would differ by an ulp
    between devices; a multiplication is the same everywhere."""
    scale = x.abs().amax(dim=-1).float().clamp_min(FP8_AMAX_MIN) * (1.0 / FP8_MAX)
    x8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    # Chunked over dim 1 so the fp32 temporary stays small.
    step = max(1, (1 << 26) // max(1, x[:, :1].numel())) if x.dim() > 2 else x.shape[1]
    for t0 in range(0, x.shape[1], step):
        xs = x[:, t0 : t0 + step].float() / scale[:, t0 : t0 + step, ..., None]
        x8[:, t0 : t0 + step] = xs.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, scale


def dequantize_keys(keys: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
    """Cached indexer keys in fp32: FP8 keys times their per-token scale, others upcast."""
    return _up(keys) if scales is None else keys.float() * scales[..., None]


def fp8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x [B, N, ..., D] in fp32 as the FP8 indexer sees it: each vector quantised to e4m3 with
    its own scale (``fp8_quantize``), then scaled back."""
    return dequantize_keys(*fp8_quantize(x))


def paged_indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    key_pool: torch.Tensor,
    key_scales: Optional[torch.Tensor],
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    topk: int,
    ordered: bool = True,
) -> torch.Tensor:
    """Top-k of the decoding tokens' indexer scores over each sequence's cached keys.

    q [B, HI, DI], w [B, HI], key_pool [NB, bs, DI] (``key_scales`` [NB, bs] for FP8 keys),
    lengths [B]. Returns token positions [B, topk] int32, -1 padded: ``min(topk, lengths[b])``
    entries, ordered and tie-broken as ``topk_from_scores``. ``ordered=False`` lets a backend
    skip ordering each row by score (the same set); these rows are ordered either way.

    With FP8 keys the query is quantised too, per head (``fp8_quantize``), so both operands of
    the products are e4m3 as in DeepSeek-V3.2's inference code and the training's FP8 indexer.
    """
    n = int(lengths.max())
    pos = torch.arange(n, device=q.device)[None].expand(q.shape[0], -1)
    keys = dequantize_keys(paged_rows(key_pool, block_table, pos),
                           None if key_scales is None else paged_rows(key_scales, block_table, pos))
    if key_scales is not None:
        q = fp8_rounded(q)
    scores = indexer_scores(q[:, None], keys, w[:, None])[:, 0]  # [B, n]
    return topk_from_scores(scores, pos < lengths[:, None].to(q.device), topk)


def _decode_attend(q: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, v_dim: int, scale: float):
    scores = torch.einsum("bhd,bkd->bhk", _up(q), _up(rows)) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    out, lse = _attend(scores, rows[..., :v_dim], "bhk,bkd->bhd")
    return out.to(q.dtype), lse


def sparse_mla_decode(
    q: torch.Tensor, kv_pool: torch.Tensor, block_table: torch.Tensor, topk_idx: torch.Tensor, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode over the selected cached latent rows: every head of a token attends to
    the same gathered rows. q [B, H, Dqk], kv_pool [NB, bs, Dqk], topk_idx [B, K] int32 token
    positions (-1 skipped). Returns out [B, H, v_dim] and lse [B, H] (no selected row: zeros
    and -inf, never NaN)."""
    return _decode_attend(q, paged_rows(kv_pool, block_table, topk_idx), topk_idx >= 0, v_dim, scale)


def dense_mla_decode(
    q: torch.Tensor, kv_pool: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode over every cached latent row of each sequence (the dense baseline):
    q [B, H, Dqk], lengths [B]. Returns out [B, H, v_dim] and lse [B, H]."""
    pos = torch.arange(int(lengths.max()), device=q.device)[None].expand(q.shape[0], -1)
    return _decode_attend(q, paged_rows(kv_pool, block_table, pos), pos < lengths[:, None].to(q.device), v_dim, scale)
