"""Kernel options: the one object that carries every choice the Triton kernels leave open.

The layer's config holds one ``KernelOptions`` (``mdsa_kernel_options``, validated once) and
passes it down through ``megatron_dsa.ops``; the kernels read nothing else (no module globals, no
environment). ``None`` fields take the measured defaults of the kernel that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

DENSE_KL = ("fused", "blockwise")
SPLIT_BWD = ("recompute", "stored_ds", "stored_scores")
GLUON_CHOICES = ("auto", "triton", "gluon")  # a stage with a Gluon kernel beside its Triton one
# the dq product's columns a program: up to four tiles of 16, 32 or 64 columns
DQ_PRODUCT_COLUMN_CHOICES = (16, 32, 48, 64, 96, 128, 192, 256)
# each such stage's choice and the tiles of its Triton kernel (the Gluon kernels' launches are fixed)
GLUON_STAGES = {"attn_fwd_kernel": "attn_fwd", "attn_dkv_product_kernel": "attn_dkv_product"}
TILE_FIELDS = ("attn_fwd", "attn_bwd", "attn_dkv", "attn_scores", "attn_dq_product", "attn_dkv_product", "kl_target",
               "kl_fwd", "kl_bwd", "decode_attn", "decode_index", "score", "select")


def _count(v: Any) -> bool:
    """An integer >= 0 (a bool is not one)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class Tiles:
    """One launch shape: keys per block (BK), warps, software-pipelining stages."""

    BK: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("BK", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"tiles.{name} must be a positive integer, got {v!r}")
        if self.BK & (self.BK - 1) or self.BK < 16:
            raise ValueError(f"tiles.BK must be a power of two >= 16, got {self.BK}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"tiles.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")


@dataclass(frozen=True)
class KernelOptions:
    """dense_kl: the warm-up KL as fused Triton kernels ("fused", measured 4.8x faster) or
    blockwise PyTorch ("blockwise"; the other indexer objectives always run it).
    attn_fwd_kernel: the sparse attention's forward as the warp-specialised Gluon kernel
    (``kernels/sparse_attn_ws.py``: Hopper, bf16, the 512 + 64 latent) or the Triton kernel.
    "auto": Gluon wherever it can run from ``sparse_attn_ws.AUTO_MIN_HEADS`` heads (where it
    measured faster), else Triton; "gluon": at any head count, an error where it cannot run;
    "triton": always Triton.
    attn_dkv_product_kernel: the same choice for the "stored_scores" backward's dkv product
    (Gluon: ``sparse_attn_ws.dkv_product_ws``, up to 128 heads, top-k a multiple of 16; "auto"
    from ``sparse_attn_ws.DKV_AUTO_MIN_HEADS`` heads).
    key_passes: how many key ranges the sparse attention's backward splits its fp32 dkv adds
    into, so each range's targets stay in L2 (0: chosen from the sizes, see
    ``sparse_attn.key_passes``; 1: one pass).
    attn_bwd_split: the sparse attention's backward split into kernels that share stored scores
    (``split_bwd``) or one kernel (None: split from 64-head blocks, where one does not fit an SM,
    and at any head count on a latent wider than 128 value columns; ``sparse_attn.split_backward``).
    split_bwd: what the split backward's kernels share. "recompute": a dq kernel and a dkv kernel
    each recompute the probabilities and score gradients (1.4x the backward's products; the dq
    kernel's [64, 576] fp32 accumulator spills), and dkv takes one fp32 add per (token, key,
    column) and head block. "stored_ds": the dkv kernel stores its score gradients (kv's dtype,
    a chunk of rows at a time) and dq is their product with the gathered rows, in column blocks
    (``attn_dq_product`` tiles). "stored_scores": one kernel makes and stores the probabilities
    and score gradients, a gathered product over slices of the latent (``attn_scores`` tiles);
    dkv is their product with every head's q and dO, one add per (token, key, column) for all
    heads up to 128 (``attn_dkv_product`` tiles), and dq as in "stored_ds". None:
    "stored_scores" (``sparse_attn.split_form``; 64K on the H200: 64 heads 208 ms against 323
    recomputing; 128 heads 402, 469 before its storing kernel became a gathered product).
    kl_target_keys_rows: the sparse KL's target kernel with the selected keys as the products'
    rows and the heads as columns (each gathered row read once per token) or the heads as rows
    (once per 64-head block); None: keys as rows above one 64-head block. That kernel serves the
    KL of a forward without gradients (evaluation); training takes the target from the sparse
    attention's backward.
    attn_fwd / attn_bwd / attn_dkv / attn_scores / attn_dq_product / attn_dkv_product / kl_target /
    kl_fwd / kl_bwd: launch tiles of those kernels (attn_bwd: the one-kernel backward, or the split
    backward's recomputing dq kernel; attn_scores: the "stored_scores" form's kernel that makes
    and stores the probabilities and score gradients; None: measured defaults). They launch the
    Triton kernels only: with attn_fwd_kernel or attn_dkv_product_kernel "gluon", setting that
    stage's tiles (attn_fwd, attn_dkv_product) is an error.
    decode_attn / decode_index: the paged decode's attention (cached rows per block) and indexer
    scoring (keys per program) launches (None: measured defaults, ``kernels.decode``).
    score: the indexer's scoring launch: keys per tile (BK; a multiple of ``select_runs``), warps
    and stages, for 64 query rows a tile (None: the measured default per operand type,
    ``kernels.indexer``).
    select: the indexer's top-k selection launch: keys a program reads per step (BK), warps and
    stages (None: the measured default, ``kernels.indexer``).
    select_runs: keys per run whose largest score the indexer's scoring keeps, so that the top-k
    selection bounds its threshold from the runs' maxima and passes over each row once (0: no
    bound, three passes; None: the measured default, ``kernels.indexer``).
    select_sample: keys between the samples (every n-th key of a row) whose large values bound
    the selection's threshold from below on the rows where the runs' bound lists more than
    ``select_cap`` keys: where the top-k crowds together (a recency bias), the runs' bound is
    loose and the sample's is not, so those rows list their candidates from the runs again
    instead of passing over the whole row (0: no sample; None: the measured default,
    ``kernels.indexer``).
    select_guess: standard deviations of a row's run maxima below where a row of the chunk
    selected before had its threshold (counted in that row's standard deviations above its
    mean) at which the selection first bounds the row's threshold: the scoring sums each row's run maxima and
    their squares, so that bound takes no histogram pass. Checked as the sample's is (fewer
    than top-k keys at or above it, or more than ``select_cap``: the runs' bound instead). 0: no
    guess; it needs ``select_runs``; None: the measured default, ``kernels.indexer``.
    select_list_values: a row's candidate list also holds each listed key's score (as its order
    key), so the passes that resolve the threshold from the list read those in order instead
    of gathering each score from the row again (one 32-byte sector a key); the list's buffer
    doubles (None: the measured default, ``kernels.indexer``).
    select_cap: keys a row's candidate list holds (those at or above the runs' bound, or those
    sharing the threshold's top bits) before the selection passes over the row again instead
    (0: always the passes; None: the default, ``kernels.indexer``).
    select_max_registers: registers a thread of the selection may hold (the compiler's maxnreg,
    16-255; it spills above them): fewer let more programs share an SM, which hides the latency
    of a kernel bound by instructions, not bytes (None: the measured default on the GPU, 80:
    three programs of 8 warps an SM, where Triton 3.6 takes 116 on sm_90, two; ``kernels.indexer``;
    none in the interpreter). 64 fits four and measured slower (91 against 81 ms for the small
    MoE's top-k at 128K on an H100 with 5-bit digits).
    select_digit_bits: bits of the 32-bit order key the selection fixes per histogram pass (5-8;
    the last digit takes what is left). Triton 3.6's histogram takes a ballot per bit and a
    popcount per bin a lane holds, so narrower digits make more, cheaper passes (None: the
    measured default, ``kernels.indexer``).
    compact_selection: keep the sparse training step's selection for its backward in 16 bits a
    key (``kernels.compact_selection``: int16 low halves and each row's block ends, one pass
    each way, rebuilt at the start of the layer's backward): 0.5 GiB a layer less at 128K x
    2048 for about 1 ms and a host sync a layer (the small MoE's 128K step on the H200: 40.1
    against 43.0 GB, 1471 against 1473 ms). On by default; rows not in key order stay int32.
    offload_selection: keep that selection in pinned host memory from the layer's forward to its
    backward (``offload.HostOffload``: copied out on a side stream as soon as it is made, and
    brought back while the backward of the layer after it runs). Frees the selection's GPU
    memory (0.5 GiB a layer at 128K x 2048) for PCIe traffic of as much each way; off by
    default (the small MoE's 128K step with ``mla_up_proj`` recomputation on an H100: 34.1
    against 37.0 GB, 1523 against 1505 ms). Under recomputation of the core attention its rerun's
    backward follows at once, so there it only costs the copies.
    select_overlap: select a chunk of rows on a second, higher-priority CUDA stream while the next
    chunk is scored, so that the selection (bound by latency) shares the SMs with the scoring
    (bound by the tensor cores); the scores are then double-buffered, two chunks of half the
    workspace each (None: on for CUDA tensors; without CUDA the same buffers alternate on one
    stream).
    dq_product_columns: q's latent columns (values and rope alike) one program of the dq product
    makes, as up to four tiles of 16, 32 or 64 (``DQ_PRODUCT_COLUMN_CHOICES``; None: 192, the
    576-wide latent in three programs a token). dkv_product_columns: the latent's value columns
    one program of the dkv product adds (a power of two >= 16; None: 128, which fits an SM's
    registers and shared memory). dkv_product_heads: the heads one dkv product program sums
    before its adds (None: 128; more heads are added in groups of it). dq_product_heads: the
    heads one dq product program makes (None: 128; each program gathers its token's selected
    rows, so fewer programs a token gather them fewer times). scores_heads: the heads one program of the stored-scores kernel
    takes as its products' columns (None: 64, two programs an SM; more take more registers and
    shared memory, fewer gather each selected row fewer times: once per group of them).
    dense_kl_span / dense_kl_rows: the fused warm-up KL's keys per program (None: 4096 on the GPU)
    and the dot rows its folded indexer heads fill (a power of two >= 16; None: 128 on the GPU).
    workspace_bytes: the largest temporary the kernels split into chunks of rows may hold: the
    indexer's fp32 scores and the attention backward's stored score gradients (as much again for
    its probabilities) take this much per chunk; the key-range passes' fp32 dq half of it; the
    blockwise dense KL's an eighth; the dense KL's recall gathers a thirty-second. Smaller:
    smaller temporaries, more launches (the small MoE's 128K training step peaks elsewhere: 39.8
    GB at 2 GiB, 40.1 at 128 MiB, on an H100).
    """

    dense_kl: str = "fused"
    attn_fwd_kernel: str = "auto"
    attn_dkv_product_kernel: str = "auto"
    key_passes: int = 0
    attn_bwd_split: Optional[bool] = None
    split_bwd: Optional[str] = None
    kl_target_keys_rows: Optional[bool] = None
    attn_fwd: Optional[Tiles] = None
    attn_bwd: Optional[Tiles] = None
    attn_dkv: Optional[Tiles] = None
    attn_scores: Optional[Tiles] = None
    attn_dq_product: Optional[Tiles] = None
    attn_dkv_product: Optional[Tiles] = None
    kl_target: Optional[Tiles] = None
    kl_fwd: Optional[Tiles] = None
    kl_bwd: Optional[Tiles] = None
    decode_attn: Optional[Tiles] = None
    decode_index: Optional[Tiles] = None
    score: Optional[Tiles] = None
    select: Optional[Tiles] = None
    select_runs: Optional[int] = None
    select_sample: Optional[int] = None
    select_guess: Optional[float] = None
    select_list_values: Optional[bool] = None
    select_cap: Optional[int] = None
    select_max_registers: Optional[int] = None
    select_digit_bits: Optional[int] = None
    select_overlap: Optional[bool] = None
    compact_selection: bool = True
    offload_selection: bool = False
    dq_product_columns: Optional[int] = None
    dkv_product_columns: Optional[int] = None
    dkv_product_heads: Optional[int] = None
    dq_product_heads: Optional[int] = None
    scores_heads: Optional[int] = None
    dense_kl_span: Optional[int] = None
    dense_kl_rows: Optional[int] = None
    workspace_bytes: int = 2 << 30

    def __post_init__(self):
        if self.dense_kl not in DENSE_KL:
            raise ValueError(f"dense_kl must be one of {list(DENSE_KL)}, got {self.dense_kl!r}")
        for name, tiles in GLUON_STAGES.items():
            if getattr(self, name) not in GLUON_CHOICES:
                raise ValueError(f"{name} must be one of {list(GLUON_CHOICES)}, got {getattr(self, name)!r}")
            if getattr(self, name) == "gluon" and getattr(self, tiles) is not None:
                raise ValueError(f"{tiles} tiles launch the Triton kernel, which {name}='gluon' never runs")
        if self.split_bwd is not None and self.split_bwd not in SPLIT_BWD:
            raise ValueError(f"split_bwd must be one of {list(SPLIT_BWD)} or null, got {self.split_bwd!r}")
        if not _count(self.key_passes):
            raise ValueError(f"key_passes must be an integer >= 0, got {self.key_passes!r}")
        r = self.select_runs
        if r is not None and (not _count(r) or r & (r - 1)):
            raise ValueError(f"select_runs must be 0, a power of two or null, got {r!r}")
        if self.select_sample is not None and not _count(self.select_sample):
            raise ValueError(f"select_sample must be an integer >= 0 or null, got {self.select_sample!r}")
        g = self.select_guess
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < float("inf")):
            raise ValueError(f"select_guess must be a number >= 0 or null, got {g!r}")
        if self.select_cap is not None and not _count(self.select_cap):
            raise ValueError(f"select_cap must be an integer >= 0 or null, got {self.select_cap!r}")
        m = self.select_max_registers
        if m is not None and not (_count(m) and 16 <= m <= 255):
            raise ValueError(f"select_max_registers must be an integer from 16 to 255 or null, got {m!r}")
        d = self.select_digit_bits
        if d is not None and not (_count(d) and 5 <= d <= 8):
            raise ValueError(f"select_digit_bits must be an integer from 5 to 8 or null, got {d!r}")
        c = self.dq_product_columns
        if c is not None and c not in DQ_PRODUCT_COLUMN_CHOICES:
            raise ValueError(f"dq_product_columns must be one of {DQ_PRODUCT_COLUMN_CHOICES} (up to four tiles of "
                             f"16, 32 or 64 columns) or null, got {c!r}")
        for name in ("dkv_product_columns", "dkv_product_heads", "dq_product_heads", "scores_heads",
                     "dense_kl_rows"):
            v = getattr(self, name)
            if v is not None and not (_count(v) and v >= 16 and not v & (v - 1)):
                raise ValueError(f"{name} must be a power of two >= 16 or null, got {v!r}")
        if self.dense_kl_span is not None and not (_count(self.dense_kl_span) and self.dense_kl_span > 0):
            raise ValueError(f"dense_kl_span must be a positive integer or null, got {self.dense_kl_span!r}")
        if not (_count(self.workspace_bytes) and self.workspace_bytes > 0):
            raise ValueError(f"workspace_bytes must be a positive integer, got {self.workspace_bytes!r}")
        for name in ("compact_selection", "offload_selection"):
            if not isinstance(getattr(self, name), bool):  # (1 == True: a membership test would pass it)
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("attn_bwd_split", "kl_target_keys_rows", "select_overlap", "select_list_values"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true, false or null, got {getattr(self, name)!r}")
        for name in TILE_FIELDS:
            v = getattr(self, name)
            if v is not None and not isinstance(v, Tiles):
                raise ValueError(f"{name} must be Tiles or None, got {v!r}")
        if self.score is not None and r and self.score.BK % r:
            raise ValueError(f"score's keys per tile ({self.score.BK}) must be a multiple of select_runs ({r})")

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "KernelOptions":
        """From plain values (a YAML mapping): tiles as [BK, num_warps, num_stages] or a mapping.
        Unknown keys and bad values raise ValueError naming the key."""
        if d is None:
            return cls()
        if isinstance(d, KernelOptions):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"kernel options must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown kernel options {unknown}; known: {sorted(known)}")
        kw = dict(d)
        for name in TILE_FIELDS:
            v = kw.get(name)
            if isinstance(v, (list, tuple)):
                if len(v) != 3:
                    raise ValueError(f"{name} must be [BK, num_warps, num_stages], got {v!r}")
                kw[name] = Tiles(*v)
            elif isinstance(v, dict):
                kw[name] = Tiles(**v)
        return cls(**kw)


DEFAULT_OPTIONS = KernelOptions()
