"""DSA under tensor, sequence and context parallelism: design note.

Notation: S sequence, B batch (1 below), H attention heads, HI / DI indexer heads / head dim,
K top-k, Dqk = kv_lora_rank + rope dims (576 in the 671B model), TP / CP group sizes, S_cp =
S / CP rows per CP rank. Bytes are what ONE rank receives per layer per step (forward +
backward), bf16 activations (2 bytes), fp32 partial sums, int32 indices;
``scripts/comm_volume.py`` prints them for real shapes (table below).

What megatron-core 0.19.2's own DSA does (``experimental_attention_variant/dsa.py``): every TP
rank runs the WHOLE indexer (scores S x S x HI x DI for all rows, identical on all TP ranks),
and under CP it all-gathers the K/V latents (S x Dqk) and the indexer keys over CP.

1. TP-sharded indexer (``megatron_dsa.core.dsa_core`` with ``sharded.tp_indexer_topk``)
   Under TP, megatron's MLA (sequence parallel on) hands the core attention x and the query
   latent qr for the rank's SP shard (S_cp / TP rows) and q for ALL rows with LOCAL heads.
   Each rank runs the indexer on its own rows only: qi, wi, ki of S_cp/TP rows. The keys are
   all-gathered over TP (DI values per token: (TP-1)/TP x S_cp x DI x 2 bytes; backward
   reduce-scatters their gradient), so each rank scores its rows against all keys:
   S_cp/TP x S x HI x DI x 2 FLOPs, 1/TP of megatron-core's replicated indexer (counted in
   ``DSACoreAttention.indexer_flops``, tested). The rows' top-k must reach the sparse
   attention, which covers every row with local heads. Two ways:
     (a) all-gather the top-k indices over TP: (TP-1)/TP x S_cp x K x 4 bytes, no backward;
     (b) re-shard attention by rows (all-to-all q to "own rows, all heads", and the output
         back): 2 x (TP-1)/TP x S_cp x H/TP x (Dqk + v) x 2 bytes forward, the same again in
         backward. For the 671B model (H=128, Dqk=576, v=512, K=2048) at TP=8:
         (a) 7.0 KiB/token vs (b) 2 x 30.5 KiB/token (x2 with backward). We take (a).
   The sparse KL target p = probabilities summed over ALL heads: each rank sums its local
   heads' selected-set probabilities for all rows (no grad) and the partial sums [S_cp, K]
   fp32 are reduce-scattered over TP ((TP-1)/TP x S_cp x K x 4 bytes), so every rank gets the
   full target for its own rows (``sharded.own_rows_target``). In training the partial sums come
   from the sparse attention's backward, which recomputes the probabilities anyway, and the KL
   runs there (``sharded.SparseAttentionKLInBackward``); without gradients a pass of its own
   makes them (``sharded.tp_sparse_kl``). For the DENSE (warm-up) KL the
   partial sums would be S_cp x S x 4 bytes (64 GiB per layer at 128K); instead the detached
   queries are re-sharded "own rows, all heads" with one all-to-all
   ((TP-1)/TP x S_cp x H/TP x Dqk x 2 bytes, no backward) and the reference KL runs on them.
   In the MHA form the layer's dense phases attend in, Dqk is 192 and the keys are each
   head's: every rank builds all heads' keys from the latent it already has and the
   all-gathered K up-projection (H x 128 x 512 x 2 bytes, ``sharded.every_heads_keys``), which
   costs S x H x 192 x 2 bytes of memory per layer (6.4 GB at 128K x 128 heads) and saves 2/3
   of the target's products.
   Indexer weights are replicated across TP but see different rows: their parameters carry
   ``.sequence_parallel = True`` (TP > 1), so megatron's ``finalize_model_grads`` sums their
   gradients over TP (``allreduce_sequence_parallel_grads`` here does the same without DDP).
   Each rank's indexer loss is sum(own rows' KL) / (B x S): the sum over ranks is the
   one-rank loss (mean over rows).

2. Context parallel with an exact distributed top-k (``topk``, ``fetch``)
   Tokens stay in megatron-core's load-balanced layout (CP rank r holds chunks r and
   2CP-1-r of 2CP). Global positions of every row are known from the layout. Indexer keys
   are all-gathered over CP (DI per token: (CP-1)/CP x S x DI x 2 bytes -- 1/4.5 of the
   latent KV in the 671B model; a ring would move the same bytes). Each rank scores its
   queries against each key chunk in turn (skipping chunks wholly in its future), keeps
   top-k CANDIDATES with GLOBAL positions and merges them with the reference's rule (score
   descending, ties to the smaller global position): the result equals the one-rank top-k
   exactly (tested with deliberate ties). Then only the selected latent KV rows are fetched
   from their owners (``fetch.fetch_selected``: unique rows, one all-to-all of row ids and
   one of rows; backward sends dKV rows back and scatter-adds them on the owner). Bytes:
   at most min(S x (CP-1)/CP, S_cp x K) x Dqk x 2, x2 with backward, instead of the whole
   (CP-1)/CP x S x Dqk x 2 KV all-gather (+ its reduce-scatter in backward). Dense mode and
   warm-up under CP all-gather the KV (acceptable: short phase; the KL target is exact).

3. Sequence parallel is switched on by the config whenever TP > 1 (megatron's MoE and
   AbsorbedMLA require it); norms of the local spec get ``.sequence_parallel`` params.
   Expert parallelism is megatron-core's MoE settings (``expert_model_parallel_size``),
   untouched by DSA; tested at EP=2 against one rank. Under TP, the MLA KV down-projection is
   replicated (``spec.DSAAbsorbedMLASelfAttention``): megatron-core 0.19.2's column-parallel
   variant leaves the rope-key gradient with only this rank's heads' share.

4. Accounting (``python scripts/comm_volume.py``; per rank, per layer, per step, fwd+bwd,
   sparse phase; TP=8 with CP=1, CP=4 with TP=1; GiB; CP "ours" is the worst case):

   model  seq  | TP ours | TP (b) rows | TP mcore (x+qr gather) | indexer FLOP/rank ours / mcore | CP ours | CP mcore
   small  32K  |  0.116  |   0.062     |   0.038                |    0.1T /   0.5T              |  0.021  |  0.021
   small 128K  |  0.465  |   0.246     |   0.150                |    1.1T /   8.8T              |  0.083  |  0.082
   671b   32K  |  0.451  |   3.719     |   0.465                |    2.2T /  17.6T              |  0.065  |  0.064
   671b   64K  |  0.902  |   7.438     |   0.930                |    8.8T /  70.4T              |  0.129  |  0.129
   671b  128K  |  1.805  |  14.875     |   1.859                |   35.2T / 281.5T              |  0.259  |  0.258

   Reading it: under TP the sharded indexer moves about what megatron-core's replicated one
   does for the 671B shape (its x + qr all-gather vs our key/index/partial-p traffic) and cuts
   the indexer FLOPs per rank by TP (8x here: 35 TFLOP instead of 281 TFLOP per layer at
   128K). Option (b) would be 8x more bytes for the 671B model; for the small model (8 heads,
   K=512) at TP=8 (b) is cheaper in bytes (0.25 vs 0.47 GiB) -- (a) was chosen for the
   671B shape. Under CP the selected-row fetch is bounded by the KV all-gather: with
   S/CP x K >= S the union of a rank's selections can cover every remote row, and then it
   moves as much as megatron-core (ratio 1.00 in the worst case). It saves only when the
   union is smaller (short shards, concentrated selections); ``STATS`` measures the real
   bytes. The exact distributed top-k, not the bytes, is the CP win here (megatron-core
   scores against gathered keys too).

Causal balance under TP: a row's indexer work (top-k scoring, dense KL) grows with its
position, so the SP shard would give the last of TP ranks (2TP-1)/TP^2 of it (3/4 at TP=2).
Each rank instead scores row blocks r and 2TP-1-r of 2TP (``comm.balanced_blocks``): its
detached indexer queries / weights go there in one all-to-all (S_cp/(2TP) x HI x (DI + 1) x 2
bytes each way, a fraction of the top-k all-gather) and, for the dense KL, the KL and the
gradients come back; the top-k all-gather is reordered into row order. Tested against one rank.

Kernels: each rank's own work runs on the ops of ``megatron_dsa.ops`` (``mdsa_kernel``: the
Triton kernels on CUDA under ``auto``). With the kernels the top-k scores the gathered keys in
one streaming pass (optionally FP8) instead of shard by shard, with the same exact result and tie
rule; dense attention under CP runs SDPA per run of consecutive positions, and the TP sparse
KL target and KL are kernels too (``sparse_target_head_sum``, ``sparse_indexer_kl_from_target``).

Limits: every TP rank of a CP group fetches the same KV rows (a TP-split fetch + all-gather
would cut that by TP).

Packed sequences: the layout is megatron's THD one (each document padded to a multiple of 2CP
and split into 2CP chunks, rank r holding chunks r and 2CP-1-r of every document); the
positions, the gathers' global order and the fetch's owners follow it (``cu_seqlens`` in
``comm``), and the document ids join the eligibility rule of the top-k, the dense attention
and the dense KL.
"""

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dsa.parallel.comm import (
    STATS,
    ParallelContext,
    balanced_blocks,
    cp_positions,
    cp_split,
    global_sequence_length,
)
from megatron_dsa.parallel.sharded import own_rows
from megatron_dsa.parallel.topk import merge_candidates, streaming_topk


def allreduce_sequence_parallel_grads(model, tp_group=None) -> None:
    """Sum over TP the gradients of parameters marked ``.sequence_parallel`` (what megatron's
    finalize_model_grads does for DDP-wrapped models), for plain modules."""
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        return
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=tp_group)


__all__ = [
    "STATS",
    "ParallelContext",
    "allreduce_sequence_parallel_grads",
    "balanced_blocks",
    "cp_positions",
    "cp_split",
    "global_sequence_length",
    "merge_candidates",
    "own_rows",
    "streaming_topk",
]
