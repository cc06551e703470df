"""Top-k recall of the dense attention mass at several context lengths and top-k sizes.

The warm-up forward of every selecting DSA layer computes, per query row, the share of the
head-summed dense attention probability (the indexer's target p) that falls in the indexer's
own top-k set, and records its mean over the rows of the forward in megatron-core's MoE
metrics tracker (``megatron_dsa.layer.TOPK_RECALL``; the indexer objective, "the KL", under
``INDEXER_KL``). ``indexer_recall_at_lengths`` runs that forward on the same windows of the
held-out stream as ``suites.loss`` (every length sees the same ``plan_total``
tokens), once per (length, k), and averages the per-layer values over all query rows.

Rows whose number of eligible (causal) keys is at most k select every key and have recall 1
by construction: in a window of length L with k < L those are exactly the first k rows. The
``mean`` counts every row (what training logs); ``mean_nontrivial`` counts only the L - k
rows that really choose, ``(L * mean - k) / (L - k)``.

The ORACLE recall is the ceiling of any indexer: the share of p in the best possible k keys,
i.e. the sum of the k largest entries of p per row (p's own top-k; ties do not matter). It is
computed here, not in the layer: a forward pre-hook on every recording layer takes the
layer's query / latent-KV inputs and recomputes p with the reference math
(``megatron_dsa.reference``, fp32, in query-row chunks of bounded size), during the first k's
forwards of each length only and for every k of that length at once (in warm-up mode the main
model is dense, so a layer's inputs do not depend on k). No extra model forward.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Optional, Sequence

import numpy
import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from experiments.verify.suites.loss import plan_total
from megatron_dsa import reference as R
from megatron_dsa.config import set_mode, validate
from megatron_dsa.layer import INDEXER_KL, TOPK_RECALL, DSACoreAttention, pop_indexer_losses
from megatron_dsa.model import dsa_layers


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{what} must be >= 1, got {value!r}")
    return int(value)


def topk_for_length(length: int, topk_ratios: Optional[Sequence[float]] = None,
                    topks: Optional[Sequence[int]] = None) -> list[int]:
    """The distinct top-k sizes evaluated at ``length``, ascending: max(1, round(r * L)) for
    each ratio r in (0, 1], or the absolute ``topks`` (k > L selects every key, as k = L)."""
    if (topk_ratios is None) == (topks is None):
        raise ValueError("give exactly one of topk_ratios (k = max(1, round(ratio * L))) or topks")
    if topks is not None:
        if isinstance(topks, (str, bytes)) or not len(topks):
            raise ValueError(f"topks must be a non-empty sequence of positive integers, got {topks!r}")
        return sorted({_positive_int(k, "every top-k") for k in topks})
    if isinstance(topk_ratios, (str, bytes)) or not len(topk_ratios):
        raise ValueError(f"topk_ratios must be a non-empty sequence of ratios in (0, 1], got {topk_ratios!r}")
    ks = set()
    for r in topk_ratios:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (0 < float(r) <= 1):
            raise ValueError(f"every top-k ratio must be a number in (0, 1], got {r!r}")
        ks.add(max(1, round(float(r) * length)))
    return sorted(ks)


def _check_inputs(model, num_tokens: int, lengths, topk_ratios, topks, max_total, max_batch_tokens):
    """Every input check, before any compute. Returns (layers, lengths, {L: [k]}, total)."""
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__len__") or not len(lengths):
        raise ValueError(f"lengths must be a non-empty sequence of positive integers, got {lengths!r}")
    lengths = sorted({_positive_int(L, "every context length") for L in lengths})
    for L in lengths:
        if L > num_tokens - 1:
            raise ValueError(
                f"context length {L} needs {L + 1} tokens (inputs + next-token targets); "
                f"the stream has {num_tokens}"
            )
    ks = {L: topk_for_length(L, topk_ratios, topks) for L in lengths}
    _positive_int(max_batch_tokens, "max_batch_tokens")
    if max_total is not None:
        _positive_int(max_total, "max_total")
    total = plan_total(num_tokens, lengths, max_total)  # ValueError when lcm(lengths) does not fit
    layers = dsa_layers(model)
    if not layers:
        raise ValueError("the model has no DSA layers (megatron_dsa.layer.DSACoreAttention)")
    if any(layer.parallel.parallel for layer in layers):
        raise ValueError(
            "indexer_recall_at_lengths reads one rank's recall: tensor/context parallel "
            "layers (whose recall covers only this rank's rows) are not supported"
        )
    return layers, lengths, ks, total


def _topk_mass(p, ks: Sequence[int]):
    """[..., Sk] probabilities -> [..., len(ks)] float64: the sum of the k largest entries of
    each row for every k in ``ks`` (k >= Sk sums the whole row)."""
    kmax = min(max(ks), p.shape[-1])
    top = torch.topk(p, kmax, dim=-1, largest=True, sorted=True).values.double().cumsum(-1)
    pick = torch.tensor([min(k, kmax) - 1 for k in ks], device=p.device)
    return top.index_select(-1, pick)


def _attention_target_chunks(query, key, scale: float):
    """The head-summed, L1-normalised causal dense attention probability p (the indexer's
    target) of a DSA core attention's ``query`` [S, B, H, Dqk] and ``key`` [S, B, 1, Dqk]
    (positions 0..S-1), in query-row chunks of at most ``reference.CHUNK_ELEMENTS`` scores:
    yields (t0, t1, p [B, t1 - t0, t1]), each chunk against only the keys it can see."""
    q = query.permute(1, 0, 2, 3)  # [B, S, H, D]
    kv = key.squeeze(2).transpose(0, 1)  # [B, S, D]
    B, S, H = q.shape[:3]
    pos = torch.arange(S, device=q.device)
    step = R._chunk_size(B * H * S, S)
    with torch.no_grad():
        for t0 in range(0, S, step):
            t1 = min(S, t0 + step)  # rows t0..t1-1 see keys 0..t1-1 at most
            scores = torch.einsum("bthd,bsd->bths", R._up(q[:, t0:t1]), R._up(kv[:, :t1])) * scale
            mask = R.causal_mask(pos[t0:t1], pos[:t1])
            probs = torch.softmax(scores.masked_fill(~mask[None, :, None, :], float("-inf")), dim=-1)
            del scores
            yield t0, t1, R.head_summed_target(probs.nan_to_num_(0.0))


def oracle_topk_mass(query, key, scale: float, ks: Sequence[int]):
    """Oracle recall per query row: the sum of the k largest entries of the head-summed,
    L1-normalised causal dense attention probability p (the indexer's target), for each k.

    ``query`` [S, B, H, Dqk] and ``key`` [S, B, 1, Dqk] as a DSA core attention receives them
    (positions 0..S-1). Returns [B, S, len(ks)] float64.
    """
    B, S = key.shape[1], key.shape[0]
    out = torch.empty(B, S, len(ks), dtype=torch.float64, device=key.device)
    for t0, t1, p in _attention_target_chunks(query, key, scale):
        out[:, t0:t1] = _topk_mass(p, ks)
    return out


def selection_mass(query, key, scale: float, selection: torch.Tensor):
    """Per query row, the share of this attention's p (see ``oracle_topk_mass``) inside
    ``selection`` [B, S, k] (key positions, -1 = unused slot), and the oracle's share (p's own
    k largest entries): two [B, S] float64 tensors."""
    B, S, k = selection.shape
    got = torch.empty(B, S, dtype=torch.float64, device=key.device)
    best = torch.empty_like(got)
    for t0, t1, p in _attention_target_chunks(query, key, scale):
        idx = selection[:, t0:t1].long()
        got[:, t0:t1] = (p.gather(-1, idx.clamp_min(0)) * (idx >= 0)).double().sum(-1)
        best[:, t0:t1] = _topk_mass(p, [k])[..., 0]
    return got, best


class _OracleHook:
    """Forward pre-hooks that add each recording layer's per-row oracle mass to running sums:
    over all rows and over the rows with more than k eligible keys, per (layer, k)."""

    def __init__(self, layers, num_layers: int):
        self.signature = inspect.signature(DSACoreAttention.forward)
        self.ids = {layer.layer_number for layer in layers}
        self.num_layers = num_layers
        self.ks: Optional[list[int]] = None  # None: the hooks do nothing
        self.handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in layers]

    def start(self, ks: Sequence[int]) -> None:
        self.ks = list(ks)
        self.sum_all = torch.zeros(self.num_layers, len(ks), dtype=torch.float64)
        self.sum_nontrivial = torch.zeros(self.num_layers, len(ks), dtype=torch.float64)

    def stop(self) -> None:
        self.ks = None

    def _hook(self, module, args, kwargs):
        if self.ks is None or module.layer_number not in self.ids:
            return None
        a = self.signature.bind(module, *args, **kwargs).arguments
        query = module.absorbed_query(a["query"])  # the dense modes hand the core an unabsorbed one
        mass = oracle_topk_mass(query, a["key"], module.softmax_scale, self.ks)  # [B, S, nk]
        S = mass.shape[1]
        n = module.layer_number - 1
        self.sum_all[n] += mass.sum((0, 1)).cpu()
        for j, k in enumerate(self.ks):
            if k < S:  # rows t >= k have t + 1 > k eligible keys
                self.sum_nontrivial[n, j] += mass[:, k:, j].sum().cpu()
        return None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _BorrowedSelectionHook:
    """Forward pre-hooks for the layers that reuse an earlier layer's selection (GLM-5's
    "shared" layers, dsa_indexer_topk_freq): how much of the reusing layer's OWN attention
    mass the borrowed top-k holds, beside that layer's oracle. In warm-up mode no layer keeps
    its selection, so the selecting layer's top-k is recomputed here from its indexer inputs
    with the reference math (the layer's tie rule; FP8 scoring is not replayed)."""

    def __init__(self, layers, num_layers: int):
        self.signature = inspect.signature(DSACoreAttention.forward)
        self.reusing = [layer for layer in layers if layer.__dict__.get("_selection_source") is not None]
        self.sources = {layer.__dict__["_selection_source"].layer_number: layer.__dict__["_selection_source"]
                        for layer in self.reusing}
        self.num_layers = num_layers
        self.active = False
        self.selection: dict[int, torch.Tensor] = {}
        self.handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for layer in [*self.sources.values(), *self.reusing]]

    def start(self) -> None:
        self.active = True
        self.sum_all = torch.zeros(self.num_layers, dtype=torch.float64)
        self.sum_nontrivial = torch.zeros(self.num_layers, dtype=torch.float64)
        self.oracle_nontrivial = torch.zeros(self.num_layers, dtype=torch.float64)

    def _hook(self, module, args, kwargs):
        if not self.active:
            return None
        a = self.signature.bind(module, *args, **kwargs).arguments
        k = module.config.dsa.topk
        if module.layer_number in self.sources and module.selects:
            S = a["x"].shape[0]
            q, key, w = module.indexer_inputs(a["x"], a["qr"], torch.arange(S, device=a["x"].device))
            self.selection[module.layer_number] = R.indexer_topk(q, key, w, min(k, S))
        if module.__dict__.get("_selection_source") is not None:
            selection = self.selection[module.__dict__["_selection_source"].layer_number]
            got, best = selection_mass(module.absorbed_query(a["query"]), a["key"], module.softmax_scale, selection)
            n = module.layer_number - 1
            self.sum_all[n] += got.sum().cpu()
            self.sum_nontrivial[n] += got[:, k:].sum().cpu()  # rows t >= k choose
            self.oracle_nontrivial[n] += best[:, k:].sum().cpu()
        return None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _recording_layers(layers) -> list:
    """The layers whose warm-up forward computes recall: those with an indexer of their own or
    a shared one (with dsa_indexer_topk_freq = N the layers that reuse a selection have none)."""
    return [layer for layer in layers if layer.indexer_module() is not None]


def _borrowed_result(hook: _BorrowedSelectionHook, total: int, L: int, k: int) -> dict:
    """One (L, k) entry's recall of the borrowed selections, per reusing layer."""
    idx = [layer.layer_number - 1 for layer in hook.reusing]
    nontrivial_rows = total // L * (L - k)
    got = (hook.sum_nontrivial[idx] / nontrivial_rows).tolist() if k < L else None
    best = (hook.oracle_nontrivial[idx] / nontrivial_rows).tolist() if k < L else None
    return {"layers": [layer.layer_number for layer in hook.reusing],
            "sources": [layer.__dict__["_selection_source"].layer_number for layer in hook.reusing],
            "per_layer": (hook.sum_all[idx] / total).tolist(),
            "per_layer_nontrivial": got, "oracle_per_layer_nontrivial": best,
            "mean_nontrivial": None if got is None else sum(got) / len(got),
            "oracle_mean_nontrivial": None if best is None else sum(best) / len(best)}


def indexer_recall_at_lengths(model, tokens, lengths: Sequence[int], topk_ratios: Optional[Sequence[float]] = None,
                              topks: Optional[Sequence[int]] = None, max_total: Optional[int] = None,
                              max_batch_tokens: int = 65536, device=None, oracle: bool = True) -> dict:
    """Mean top-k recall (and indexer loss) of ``model``'s indexers per context length and k.

    For each length L (windows of the first ``plan_total`` tokens of ``tokens``, as
    ``validation_loss_at_lengths``) and each k (``max(1, round(ratio * L))`` per ratio in
    ``topk_ratios``, or each of ``topks``), the model runs in warm-up mode under no_grad with
    its indexer top-k set to k. Returns::

        {L: {k: {"mean": float,                  # recall over all rows and recording layers
                 "per_layer": [float, ...],      # one per entry of "layers"
                 "mean_nontrivial": float|None,  # rows with > k eligible keys (None if k >= L)
                 "per_layer_nontrivial": [...]|None,
                 "kl": float, "kl_per_layer": [...],  # the indexer objective's mean per row
                 # the ceiling of any indexer: share of p in p's own k largest entries,
                 # same averaging as the four recall keys above (all None if not ``oracle``)
                 "oracle_mean": float, "oracle_per_layer": [float, ...],
                 "oracle_mean_nontrivial": float|None, "oracle_per_layer_nontrivial": [...]|None,
                 "layers": [int, ...],           # layer numbers that compute recall
                 "k_over_L": float, "rows": int,
                 # only where some layers reuse an earlier layer's selection: the share of each
                 # reusing layer's own p inside the selection it borrows, and its own oracle
                 "borrowed": {"layers": [...], "sources": [...], "per_layer": [...],
                              "per_layer_nontrivial": [...]|None, "oracle_per_layer_nontrivial": [...]|None,
                              "mean_nontrivial": float|None, "oracle_mean_nontrivial": float|None}}}}

    The oracle depends only on the main model (not on the indexer) and costs one extra
    reference computation of p per recording layer and window per length (``oracle=False``
    skips it, and the borrowed selections' recall with it).

    The model's mode, top-k, training flags, per-layer FLOP counters and megatron-core's
    metrics tracker are as before afterwards. Raises ValueError on bad inputs before any compute.
    """
    stream = torch.as_tensor(numpy.asarray(tokens), dtype=torch.long).reshape(-1)
    layers, lengths, ks, total = _check_inputs(model, len(stream), lengths, topk_ratios, topks,
                                               max_total, max_batch_tokens)
    device = device or next(model.parameters()).device

    configs = list({id(layer.config): layer.config for layer in layers}.values())
    saved_configs = [(c, c.mdsa_mode, c.dsa_indexer_topk, c.dsa) for c in configs]
    saved_flops = [(layer, layer.indexer_flops) for layer in layers]
    saved_training = [(m, m.training) for m in model.modules()]
    tracker = get_moe_metrics_tracker()
    saved_metrics = {name: entry.values.detach().clone() for name, entry in tracker.metrics.items()}

    def take(name: str, num: int) -> torch.Tensor:
        """This forward's per-layer values of ``name`` (float64, CPU), then zero them."""
        entry = tracker.metrics.get(name)
        if entry is None:
            return torch.zeros(num, dtype=torch.float64)
        values = entry.values.detach().to("cpu", torch.float64).clone()
        entry.values.zero_()
        return values

    out: dict = {}
    hook = borrowed = None
    try:
        for c in configs:
            set_mode(c, "warmup")  # DSAConfigError (a ValueError) if the config cannot warm up
        recording = _recording_layers(layers)
        layer_ids = [layer.layer_number for layer in recording]
        # an MTP layer is numbered after the decoder's (megatron-core's MTP block)
        num_layers = max(c.num_layers + (getattr(c, "mtp_num_layers", None) or 0) for c in configs)
        for name in (TOPK_RECALL, INDEXER_KL):
            if name in tracker.metrics:
                tracker.metrics[name].values.zero_()
        if oracle:
            hook = _OracleHook(recording, num_layers)
            borrowed = _BorrowedSelectionHook(layers, num_layers)
            if not borrowed.reusing:
                borrowed.remove()
                borrowed = None
        model.eval()
        with torch.no_grad():
            for L in lengths:
                x = stream[:total].view(-1, L)
                bs = max(1, max_batch_tokens // L)
                out[L] = {}
                for i, k in enumerate(ks[L]):
                    if hook is not None and i == 0:  # the first k's forwards: the oracle for every k
                        hook.start(ks[L])
                    elif hook is not None:
                        hook.stop()
                    for c in configs:
                        c.dsa_indexer_topk = min(k, L)  # k > L selects every key, as k = L
                        c.dsa = validate(c)
                    if borrowed is not None:
                        borrowed.start()
                    recall_sum = torch.zeros(num_layers, dtype=torch.float64)
                    kl_sum = torch.zeros(num_layers, dtype=torch.float64)
                    for b in range(0, x.shape[0], bs):
                        xb = x[b:b + bs].to(device)
                        pos = torch.arange(L, device=device)[None].expand(xb.shape[0], -1)
                        model(xb, pos, None)
                        pop_indexer_losses(model)  # the warm-up loss each layer keeps for backward
                        rows = xb.shape[0] * L  # each layer recorded its mean over these rows
                        recall_sum += take(TOPK_RECALL, num_layers) * rows
                        kl_sum += take(INDEXER_KL, num_layers) * rows
                    idx = [n - 1 for n in layer_ids]
                    per_layer = (recall_sum[idx] / total).tolist()
                    kl_layer = (kl_sum[idx] / total).tolist()
                    nontrivial = None if k >= L else [(r * L - k) / (L - k) for r in per_layer]
                    oracle_layer = oracle_nontrivial = None
                    if hook is not None:
                        j = ks[L].index(k)
                        oracle_layer = (hook.sum_all[idx, j] / total).tolist()
                        if k < L:
                            oracle_nontrivial = (hook.sum_nontrivial[idx, j] / (total // L * (L - k))).tolist()
                    out[L][k] = {
                        "mean": sum(per_layer) / len(per_layer),
                        "per_layer": per_layer,
                        "mean_nontrivial": None if nontrivial is None else sum(nontrivial) / len(nontrivial),
                        "per_layer_nontrivial": nontrivial,
                        "kl": sum(kl_layer) / len(kl_layer),
                        "kl_per_layer": kl_layer,
                        "oracle_mean": None if oracle_layer is None else sum(oracle_layer) / len(oracle_layer),
                        "oracle_per_layer": oracle_layer,
                        "oracle_mean_nontrivial": (None if oracle_nontrivial is None
                                                   else sum(oracle_nontrivial) / len(oracle_nontrivial)),
                        "oracle_per_layer_nontrivial": oracle_nontrivial,
                        "layers": list(layer_ids),
                        "k_over_L": k / L,
                        "rows": total,
                    }
                    if borrowed is not None:
                        out[L][k]["borrowed"] = _borrowed_result(borrowed, total, L, k)
    finally:
        if hook is not None:
            hook.remove()
        if borrowed is not None:
            borrowed.remove()
        for c, mode, topk, settings in saved_configs:
            c.mdsa_mode, c.dsa_indexer_topk, c.dsa = mode, topk, settings
        for layer, flops in saved_flops:
            layer.indexer_flops = flops
        for m, training in saved_training:
            m.training = training
        pop_indexer_losses(model)
        for name in list(tracker.metrics):
            if name in saved_metrics:
                tracker.metrics[name].values.copy_(saved_metrics[name])
            else:  # created by this evaluation (e.g. the first recall ever recorded)
                del tracker.metrics[name]
    return out
