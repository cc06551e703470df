"""Worker functions for tests/test_parallel.py (each rank a process of its own: ``spawn``).

On CPU the ranks talk over gloo. With ``MDSA_TEST_DEVICE=cuda`` each rank takes its own GPU and
NCCL, and every tensor (inputs, the one-rank reference, the models) lives on that GPU: the same
checks then run on a multi-GPU machine.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_dsa import reference as R
from helpers import set_indexer_loss_scale  # tests/ is on the path (the workers' modules are imported from it)


ON_GPU = os.environ.get("MDSA_TEST_DEVICE") == "cuda"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ON_GPU else torch.device("cpu")


def init_dist(rank: int, world: int, port: int) -> None:
    """Join the process group whose store ``spawn``'s process serves on ``port``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    torch.set_num_threads(1)
    if ON_GPU:
        torch.cuda.set_device(rank)
        # fp32 matmuls stay fp32, so one rank and many agree to fp32 rounding.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    dist.init_process_group("nccl" if ON_GPU else "gloo", store=store, rank=rank, world_size=world)


def make_groups(tp: int, cp: int):
    """megatron's rank order: TP fastest, then CP. Returns (tp_group, cp_group) of this rank."""
    rank = dist.get_rank()
    tp_group = cp_group = None
    for c in range(cp):
        g = dist.new_group([c * tp + t for t in range(tp)])
        if rank // tp == c:
            tp_group = g
    for t in range(tp):
        g = dist.new_group([c * tp + t for c in range(cp)])
        if rank % tp == t:
            cp_group = g
    return tp_group, cp_group


# ---------------------------------------------------------------------------------------------
# Layer-function level
# ---------------------------------------------------------------------------------------------

SHAPE = dict(B=2, S=32, H=4, D=12, V=8, HI=2, DI=8, K=6)


def tie_inputs(seed: int):
    """Indexer inputs on a dyadic grid (exact fp32 dot products in any order) with duplicated
    keys and queries, so many scores tie exactly; random attention inputs."""
    s = SHAPE
    g = torch.Generator().manual_seed(seed)
    qi = torch.randint(-2, 3, (s["B"], s["S"], s["HI"], s["DI"]), generator=g).float() / 2
    ki = torch.randint(-2, 3, (s["B"], s["S"], s["DI"]), generator=g).float() / 2
    wi = torch.randint(1, 4, (s["B"], s["S"], s["HI"]), generator=g).float() / 4
    # Duplicate keys: equal scores at different global positions (across CP chunks, too).
    ki[:, 9] = ki[:, 2]
    ki[:, 20] = ki[:, 2]
    ki[:, 27] = ki[:, 13]
    ki[:, 30] = ki[:, 5]
    q = torch.randn(s["B"], s["S"], s["H"], s["D"], generator=g)
    kv = torch.randn(s["B"], s["S"], s["D"], generator=g)
    cot = torch.randn(s["B"], s["S"], s["H"], s["V"], generator=g)
    return {k: v.to(device()) for k, v in dict(q=q, kv=kv, qi=qi, ki=ki, wi=wi, cot=cot).items()}


def reference_run(inp, mode: str, sparse_loss: bool = True):
    s = SHAPE
    scale = s["D"] ** -0.5
    t = {k: v.clone().requires_grad_(k != "cot") for k, v in inp.items()}
    kl = recall = topk = None
    if mode in ("dense", "warmup"):
        out, _ = R.dense_mla_attention(t["q"], t["kv"], s["V"], scale)
        if mode == "warmup":
            kl, recall = R.dense_indexer_kl(t["q"], t["kv"], t["qi"], t["ki"], t["wi"], scale, s["K"])
    else:
        topk = R.indexer_topk(t["qi"], t["ki"], t["wi"], s["K"])
        out, _ = R.sparse_mla_attention(t["q"], t["kv"], topk, s["V"], scale)
        if sparse_loss:
            kl = R.sparse_indexer_kl(t["q"], t["kv"], t["qi"], t["ki"], t["wi"], topk, scale)
        else:
            kl, recall = R.dense_indexer_kl(t["q"], t["kv"], t["qi"], t["ki"], t["wi"], scale, s["K"])
    loss = (out * t["cot"]).sum() + (0 if kl is None else kl.sum())
    loss.backward()
    grads = {
        k: t[k].grad if t[k].grad is not None else torch.zeros_like(t[k])
        for k in ("q", "kv", "qi", "ki", "wi")
    }
    return dict(out=out.detach(), kl=kl, recall=recall, topk=topk, grads=grads)


def documents_run(inp, mode: str, sparse_loss: bool, cu_seqlens: torch.Tensor):
    """``reference_run`` on each document of a packed sequence ALONE, put back in packed order:
    top-k indices shifted to packed rows, gradients of each document's own rows."""
    bounds = cu_seqlens.tolist()
    runs = [(a, reference_run({k: v[:, a:b] for k, v in inp.items()}, mode, sparse_loss))
            for a, b in zip(bounds[:-1], bounds[1:])]
    cat = lambda parts: None if parts[0] is None else torch.cat(parts, dim=1)  # noqa: E731
    topk = [None if r["topk"] is None else torch.where(r["topk"] >= 0, r["topk"] + a, -1) for a, r in runs]
    return dict(
        out=cat([r["out"] for _, r in runs]), kl=cat([r["kl"] for _, r in runs]),
        recall=cat([r["recall"] for _, r in runs]), topk=cat(topk),
        grads={k: cat([r["grads"][k] for _, r in runs]) for k in runs[0][1]["grads"]},
    )


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _close(name, a, b, atol=2e-5, rtol=1e-4):
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=rtol):
        diff = (a - b).abs().max().item() if a.shape == b.shape else "shape"
        raise AssertionError(f"rank {_rank()}: {name} differs (max abs diff {diff}, {a.shape} vs {b.shape})")


def layer_function_worker(rank, world, port, tp, cp, seed, modes, kernel="reference", cu_seqlens=None):
    if kernel != "reference" and not ON_GPU:  # the kernels through Triton's interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        from helpers import skip_repeated_interpreter_patching

        skip_repeated_interpreter_patching()  # what tests/conftest.py does in the test process
    init_dist(rank, world, port)
    from megatron_dsa.parallel import ParallelContext

    tp_group, cp_group = make_groups(tp, cp)
    ctx = ParallelContext(tp_group=tp_group if tp > 1 else None, cp_group=cp_group if cp > 1 else None)
    check_core_against_reference(ctx, seed, modes, kernel, cu_seqlens)
    dist.barrier()
    dist.destroy_process_group()


def check_core_against_reference(ctx, seed, modes, kernel="reference", cu_seqlens=None):
    """``core.dsa_core`` on this rank's share of the one-rank tensors (heads over TP, own SP
    rows for the indexer, megatron's CP chunks) equals the reference math on one rank: top-k
    sets (with exact ties), outputs, KL, recall (every row and sampled), gradients, and the
    indexer FLOPs (1/TP of one rank's). ``ctx`` of size 1 is the one-rank path itself.

    ``cu_seqlens``: the inputs are a packed sequence with these document boundaries (megatron's
    packed CP layout: each document in 2 * CP chunks), and the expected values are each
    document run alone (``documents_run``)."""
    from megatron_dsa import ops
    from megatron_dsa.core import KLInBackward, dsa_core
    from megatron_dsa.parallel import balanced_blocks, cp_split, own_rows
    from megatron_dsa.parallel.sharded import can_balance

    backend = ops.backend(kernel, device())
    assert backend.name == kernel
    tp, cp = ctx.tp_size, ctx.cp_size
    s = SHAPE
    inp = tie_inputs(seed)
    heads = slice(ctx.tp_rank * s["H"] // tp, (ctx.tp_rank + 1) * s["H"] // tp)
    cp_split_ = lambda x: cp_split(x, cp, ctx.cp_rank, cu_seqlens=cu_seqlens)  # noqa: E731
    for mode, sparse_loss in modes:
        if cu_seqlens is None:
            ref = reference_run(inp, mode, sparse_loss)
        else:
            ref = documents_run(inp, mode, sparse_loss, cu_seqlens)
        loc = {k: cp_split_(v) for k, v in inp.items()}
        rows = own_rows(ctx, s["S"] // cp)
        mine = dict(
            q=loc["q"][:, :, heads].clone().requires_grad_(),
            kv=loc["kv"].clone().requires_grad_(),
            qi=loc["qi"][:, rows].clone().requires_grad_(),
            ki=loc["ki"][:, rows].clone().requires_grad_(),
            wi=loc["wi"][:, rows].clone().requires_grad_(),
        )
        indexer = None if mode == "dense" else (mine["qi"], mine["ki"], mine["wi"])
        res = dsa_core(
            ctx, mode, mine["q"], mine["kv"], s["V"], s["D"] ** -0.5, s["K"],
            indexer=indexer, sparse_loss=sparse_loss, backend=backend, cu_seqlens=cu_seqlens,
        )
        tag = f"{mode}(sparse_loss={sparse_loss}) tp={tp} cp={cp} {kernel}" + (" packed" if cu_seqlens is not None else "")
        ref_out = cp_split_(ref["out"])[:, :, heads]
        _close(tag + " out", res.out, ref_out)
        if ref["topk"] is not None:
            assert res.topk.dtype == ref["topk"].dtype == torch.int32, (tag, res.topk.dtype)
            # Same sets per row (the kernels skip ordering each row by score).
            want = cp_split_(ref["topk"]).sort(-1).values
            if not torch.equal(res.topk.sort(-1).values, want):
                bad = (res.topk.sort(-1).values != want).nonzero()[:5].tolist()
                raise AssertionError(f"rank {_rank()}: {tag} top-k differs at {bad}")
        if ref["kl"] is not None:
            _close(tag + " kl", res.kl, cp_split_(ref["kl"])[:, rows])
        if ref["recall"] is not None:
            _close(tag + " recall", res.recall, cp_split_(ref["recall"])[:, rows])
            # The diagnostic on sampled rows (mdsa_recall_rows): 2 per rank, the last own one included.
            sampled = dsa_core(
                ctx, mode, mine["q"].detach(), mine["kv"].detach(), s["V"], s["D"] ** -0.5, s["K"],
                indexer=tuple(t.detach() for t in indexer), sparse_loss=sparse_loss, backend=backend,
                recall_rows=2 * tp * cp, cu_seqlens=cu_seqlens,
            ).recall
            # Sampled on the rows this rank scores: its causally balanced blocks under TP.
            want = cp_split_(ref["recall"])
            if can_balance(ctx, rows.stop - rows.start):
                h = (rows.stop - rows.start) // 2
                want = torch.cat([want[:, b * h:(b + 1) * h] for b in balanced_blocks(tp, ctx.tp_rank)], dim=1)
            else:
                want = want[:, rows]
            picked = R.recall_sample_rows(want.shape[1], 2, sampled.device)
            _close(tag + " sampled recall", sampled, want if picked is None else want[:, picked])
        cot = cp_split_(inp["cot"])[:, :, heads]
        loss = (res.out * cot).sum() + (0 if res.kl is None else res.kl.sum())
        loss.backward()
        rg = {k: cp_split_(v) for k, v in ref["grads"].items()}

        def check_grads(tag, mine):
            g = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in mine.items()}
            if tp > 1:  # kv is replicated over TP (MLA gathered it): its gradient is the sum
                dist.all_reduce(g["kv"], group=ctx.tp_group)
            _close(tag + " dq", g["q"], rg["q"][:, :, heads])
            _close(tag + " dkv", g["kv"], rg["kv"])
            for k in ("qi", "ki", "wi"):
                _close(tag + " d" + k, g[k], rg[k][:, rows])

        check_grads(tag, mine)
        if mode == "sparse" and sparse_loss and cp == 1:
            full = s["B"] * s["S"] * s["S"] * s["HI"] * s["DI"] * 2
            assert res.indexer_flops * tp == full, (res.indexer_flops, full)
        if mode == "sparse" and sparse_loss:
            # The training step's form: the KL computed in the attention's backward from the
            # probabilities it recomputes, weighted by d loss / d row KL (1 here, as above).
            again = {k: v.detach().clone().requires_grad_() for k, v in mine.items()}
            recorded = []
            res2 = dsa_core(
                ctx, mode, again["q"], again["kv"], s["V"], s["D"] ** -0.5, s["K"],
                indexer=(again["qi"], again["ki"], again["wi"]), backend=backend, cu_seqlens=cu_seqlens,
                kl_in_backward=KLInBackward(lambda: 1.0, recorded.append),
            )
            assert res2.kl is None and not recorded, (tag, "the KL belongs to the backward")
            _close(tag + " out (KL in backward)", res2.out, ref_out)
            (res2.out * cot).sum().backward()
            assert len(recorded) == 1, (tag, len(recorded))
            _close(tag + " kl (KL in backward)", recorded[0], cp_split_(ref["kl"])[:, rows])
            check_grads(tag + " (KL in backward)", again)


def balanced_topk_worker(rank, world, port, seed):
    """TP = world: the balanced row exchange, the rows' order after the all-gather, equal causal
    work per rank, and tp_indexer_topk == the one-rank top-k (balanced and fallback shapes)."""
    init_dist(rank, world, port)
    from megatron_dsa.parallel import STATS, ParallelContext, balanced_blocks, own_rows
    from megatron_dsa.parallel.sharded import balanced_to_rows, rows_to_balanced, tp_indexer_topk

    ctx = ParallelContext(tp_group=dist.group.WORLD)
    dev = device()
    for S in (8 * world, 8 * world + world):  # n even: balanced; n odd: SP rows
        ids = torch.arange(S, device=dev)[None, :, None].float().expand(2, -1, 3)  # [B, S, 3]
        rows = own_rows(ctx, S)
        n = rows.stop - rows.start
        if n % 2 == 0:
            got = rows_to_balanced(ids[:, rows], ctx, "test")
            h = n // 2
            a, b = balanced_blocks(world, rank)
            want = torch.cat((ids[:, a * h:(a + 1) * h], ids[:, b * h:(b + 1) * h]), dim=1)
            assert torch.equal(got, want), (rank, got[0, :, 0], want[0, :, 0])
            # Causal pairs per rank (sum of (position + 1)) are equal on every rank.
            work = torch.tensor([float((got[0, :, 0] + 1).sum())], device=dev)
            works = [torch.empty_like(work) for _ in range(world)]
            dist.all_gather(works, work)
            assert len({float(w) for w in works}) == 1, works
            parts = [torch.empty_like(got) for _ in range(world)]
            dist.all_gather(parts, got.contiguous())
            assert torch.equal(balanced_to_rows(torch.cat(parts, dim=1), world), ids)

        g = torch.Generator().manual_seed(seed + S)
        qi, ki = torch.randn(1, S, 4, 8, generator=g), torch.randn(1, S, 8, generator=g)
        wi = torch.randn(1, S, 4, generator=g)
        ki[:, 1::5] = ki[:, 0:1]  # exact ties: duplicated keys
        want = R.indexer_topk(qi, ki, wi, 6)
        from megatron_dsa import ops as OPS

        STATS.reset()
        got = tp_indexer_topk(OPS.backend("reference", dev), qi[:, rows].to(dev), ki.to(dev), wi[:, rows].to(dev),
                              torch.arange(S, device=dev), 6, ctx, [0])
        assert got.dtype == want.dtype == torch.int32 and torch.equal(got.cpu(), want), (rank, S, got.dtype)
        assert ("tp.indexer_q_balance" in STATS.bytes) == (n % 2 == 0), STATS.bytes
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) in ``world`` processes; a failure raises here. This
    process serves the ranks' rendezvous store on ``port``, bound before any rank starts."""
    import torch.multiprocessing as mp

    from megatron_dsa.distributed import local_store

    if ON_GPU and world > torch.cuda.device_count():
        import pytest

        pytest.skip(f"needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    store = local_store(world)
    method = "spawn"
    if not ON_GPU:
        # On CPU the ranks fork from a server process that imported torch, megatron-core and this
        # module once (a fresh interpreter per rank spent seconds on those imports, most of these
        # tests' time). The first call starts it, with this process's environment of that moment
        # (the ranks see that one); it never runs a torch op and holds no process group.
        import multiprocessing

        multiprocessing.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        method = "forkserver"
    mp.start_processes(fn, args=(world, store.port) + args, nprocs=world, join=True, start_method=method)


FORKSERVER_PRELOAD = ("torch", "torch.distributed", "megatron.core.parallel_state", "megatron_dsa.model", "patches",
                      "parallel_workers")


# ---------------------------------------------------------------------------------------------
# Model level: a few SGD steps of the tiny MoE, TP/CP vs one rank
# ---------------------------------------------------------------------------------------------


def _build(mode: str, seed: int, overrides: dict):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsa.model import build_model, model_config

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    # Built on the CPU (the same initial weights on every rank and device), then moved.
    config = model_config("tiny", mdsa_mode=mode, mdsa_kernel="reference", use_cpu_initialization=True, **overrides)
    return build_model("tiny", config).to(device())


def _shard(name: str, full: torch.Tensor, param, tp: int, tp_rank: int, glu: bool) -> torch.Tensor:
    """The TP shard of a one-rank parameter (megatron's layout, incl. the [gate; up] GLU split)."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if glu and name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat((gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]), dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def _step_losses(model, mode, tokens, positions, labels, total_tokens, lr, grads_out, after_backward):
    """One forward/backward/SGD step; returns (this rank's LM loss share, KL share)."""
    from megatron_dsa.layer import pop_indexer_losses
    from megatron_dsa.model import indexer_parameters

    set_indexer_loss_scale(1.0)
    per_token = model(tokens, positions, None, labels=labels)
    lm = per_token.float().sum() / total_tokens
    kl_losses = pop_indexer_losses(model)
    kl = sum(kl_losses) if kl_losses else torch.zeros((), device=device())
    if mode == "warmup":
        kl.backward()
        params = indexer_parameters(model)
    else:
        lm.backward()
        params = [p for p in model.parameters()]
    after_backward(model)
    if grads_out is not None:
        grads_out.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad
    model.zero_grad(set_to_none=True)
    return lm.detach(), kl.detach()


def model_worker(rank, world, port, tp, cp, runs, seed, steps, overrides):
    """runs: modes, or (mode, overrides of that run's own) pairs, one after the other."""
    init_dist(rank, world, port)
    import patches

    patches.apply_cpu_patches()
    for run in runs:
        mode, own = (run, {}) if isinstance(run, str) else run
        _model_run(rank, tp, cp, mode, seed, steps, dict(overrides, **own))
    dist.barrier()
    dist.destroy_process_group()


def _model_run(rank, tp, cp, mode, seed, steps, overrides):
    from megatron.core import parallel_state as ps

    from megatron_dsa.model import dsa_layers
    from megatron_dsa.parallel import STATS, allreduce_sequence_parallel_grads, cp_split

    overrides = dict(overrides)
    B, S, lr = 2, 32, 0.05
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (B, S), generator=g).to(device())
    labels = tokens.roll(-1, dims=1)
    positions = torch.arange(S, device=device())[None].expand(B, -1)

    # One rank's model and its trajectory (each process computes it alone: DP replicas).
    ps.initialize_model_parallel()
    ref = _build(mode, seed, overrides)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_losses, ref_grads = [], {}
    for step in range(steps):
        grads = ref_grads if step == 0 else None
        lm, kl = _step_losses(ref, mode, tokens, positions, labels, B * S, lr, grads, lambda m: None)
        ref_losses.append((lm.item(), kl.item()))
    ref_final = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_flops = sum(l.indexer_flops for l in dsa_layers(ref))
    del ref
    ps.destroy_model_parallel()

    # The same model under TP x CP.
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    tp_group, cp_group = ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group()
    tp_rank, cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
    model = _build(mode, seed, dict(overrides, tensor_model_parallel_size=tp, context_parallel_size=cp))
    assert model.config.sequence_parallel == (tp > 1)
    glu = model.config.gated_linear_unit
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(_shard(n, start[n], p, tp, tp_rank, glu))

    def reduce_grads(m):
        allreduce_sequence_parallel_grads(m, tp_group)  # what finalize_model_grads does over TP
        if cp > 1:  # every parameter is replicated over CP: sum the shares (DDP over dp x cp)
            for p in m.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=cp_group)

    tok, pos, lab = (cp_split(t, cp, cp_rank) for t in (tokens, positions, labels))
    STATS.reset()
    for step in range(steps):
        grads = {} if step == 0 else None
        lm, kl = _step_losses(model, mode, tok, pos, lab, B * S, lr, grads, reduce_grads)
        if step == 0:  # first-step gradients of every parameter, TP-sliced, vs one rank
            assert set(grads) == set(ref_grads), (mode, set(grads) ^ set(ref_grads))
            for n, p in model.named_parameters():
                if n in grads:
                    want = _shard(n, ref_grads[n], p, tp, tp_rank, glu)
                    scale = want.abs().max().item() + 1e-12
                    err = (grads[n] - want).abs().max().item()
                    assert err <= 1e-4 * scale + 1e-7, f"rank {rank} {mode}: grad of {n} off by {err:.3g} (max {scale:.3g})"
        dist.all_reduce(lm, group=cp_group)  # TP ranks hold the same LM loss; CP ranks shares
        dist.all_reduce(kl)  # the KL is split over every TP x CP rank
        want_lm, want_kl = ref_losses[step]
        assert abs(lm.item() - want_lm) <= 1e-5 * max(1.0, abs(want_lm)), (mode, step, lm.item(), want_lm)
        assert abs(kl.item() - want_kl) <= 1e-5 * max(1.0, abs(want_kl)), (mode, step, kl.item(), want_kl)
    for n, p in model.named_parameters():
        want = _shard(n, ref_final[n], p, tp, tp_rank, glu)
        if not torch.allclose(p.detach(), want, atol=1e-4, rtol=1e-3):
            raise AssertionError(
                f"rank {rank} {mode}: parameter {n} differs after {steps} steps "
                f"(max abs diff {(p.detach() - want).abs().max().item():.3g})"
            )
    # Only the warm-up's target under TP builds every head's keys (from the gathered K up-projection).
    assert ("tp.k_up_heads" in STATS.bytes) == (mode == "warmup" and tp > 1), (mode, sorted(STATS.bytes))
    flops = sum(l.indexer_flops for l in dsa_layers(model))
    if mode != "dense" and cp == 1:
        # The TP-sharded indexer: each rank scores 1/TP of the rows against all keys.
        assert flops * tp == ref_flops and flops > 0, (flops, ref_flops)
    del model
    ps.destroy_model_parallel()


# ---------------------------------------------------------------------------------------------
# Expert parallel: megatron-core's MoE settings, the DSA model unchanged
# ---------------------------------------------------------------------------------------------


def _expert_global_name(name: str, ep_rank: int, local_experts: int) -> str:
    """decoder.layers.L.mlp.experts.local_experts.j.* on EP rank r is global expert r*n + j."""
    marker = ".local_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    j, rest = tail.split(".", 1)
    return f"{head}{marker}{ep_rank * local_experts + int(j)}.{rest}"


def expert_parallel_worker(rank, world, port, ep, seed):
    """Every EP rank feeds the same batch: its loss equals one rank's, non-expert gradients
    equal one rank's, and each expert's gradient is ``ep`` times one rank's (it receives the
    same tokens from every rank)."""
    init_dist(rank, world, port)
    import patches

    patches.apply_cpu_patches()
    from megatron.core import parallel_state as ps

    B, S = 2, 32
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (B, S), generator=g).to(device())
    labels, positions = tokens.roll(-1, dims=1), torch.arange(S, device=device())[None].expand(B, -1)

    def loss_and_grads(model):
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    ps.initialize_model_parallel()
    ref = _build("sparse", seed, {})
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_loss, ref_grads = loss_and_grads(ref)
    del ref
    ps.destroy_model_parallel()

    ps.initialize_model_parallel(expert_model_parallel_size=ep)
    model = _build("sparse", seed, {"expert_model_parallel_size": ep})
    local = model.config.num_moe_experts // ep
    names = {n: _expert_global_name(n, ps.get_expert_model_parallel_rank(), local) for n, _ in model.named_parameters()}
    assert any(".local_experts." in n for n in names) and len(names) < len(start)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[names[n]])
    loss, grads = loss_and_grads(model)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item())), (loss.item(), ref_loss.item())
    for n, grad in grads.items():
        want = ref_grads[names[n]] * (ep if ".local_experts." in n else 1)
        err = (grad - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item() + 1e-7, f"rank {rank}: grad of {n} off by {err:.3g}"
    del model
    ps.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Pipeline parallel: megatron-core's schedules over DSA layers
# ---------------------------------------------------------------------------------------------


def _pipeline_loss(model, mode, loss_mask, output_tensor):
    """The trainer's loss in Megatron's form (sum, tokens, report): LM loss; in warm-up the
    indexer KL, popped from this stage's layers (one stage) or attached to every stage's layer
    outputs (pipeline parallel: the zero LM term carries the backward through the stages)."""
    from megatron_dsa.layer import pop_indexer_losses

    losses = output_tensor.float().view(-1)
    num_tokens = loss_mask.sum()
    lm = (losses * loss_mask.view(-1)).sum()
    loss = lm
    if mode == "warmup":
        popped = pop_indexer_losses(model)
        loss = lm * 0.0 + (sum(popped) * num_tokens if popped else 0.0)
    return loss, num_tokens.int(), {"lm loss": torch.stack([lm.detach(), num_tokens])}


def _pipeline_steps(chunks, mode, batches, steps, lr, reduce_grads):
    """``steps`` SGD steps of Megatron's forward-backward schedule over ``chunks`` (one model
    chunk per virtual stage), one microbatch per batch row. Returns the LM losses the last
    stage saw per step (None elsewhere) and the first step's gradients by parameter object."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        tokens, positions, labels = next(data_iterator)
        return model(tokens, positions, None, labels=labels), partial(_pipeline_loss, model, mode,
                                                                      torch.ones_like(labels, dtype=torch.float))

    tokens, positions, labels = batches
    micro = [(tokens[i:i + 1], positions[i:i + 1], labels[i:i + 1]) for i in range(tokens.shape[0])]
    losses, first_grads = [], {}
    schedule = get_forward_backward_func()
    for step in range(steps):
        iters = [iter(micro) for _ in chunks]
        out = schedule(forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
                       model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro),
                       seq_length=tokens.shape[1], micro_batch_size=1, forward_only=False)
        for c in chunks:
            reduce_grads(c)
        if out:  # the last stage: one report per microbatch
            losses.append(sum(float(r["lm loss"][0] / r["lm loss"][1]) for r in out) / len(out))
        if step == 0:
            first_grads = {p: p.grad.detach().clone() for c in chunks for p in c.parameters() if p.grad is not None}
        with torch.no_grad():
            for c in chunks:
                for p in c.parameters():
                    if p.grad is not None:
                        p -= lr * p.grad
                c.zero_grad(set_to_none=True)
    return losses, first_grads


def _global_names(chunk):
    """Parameter name -> the one-rank model's name (a stage numbers its layers from 0)."""
    names = {}
    for name, _ in chunk.named_parameters():
        if name.startswith("decoder.layers."):
            local, rest = name[len("decoder.layers."):].split(".", 1)
            number = chunk.decoder.layers[int(local)].layer_number
            name_global = f"decoder.layers.{number - 1}.{rest}"
        else:
            name_global = name
        names[name] = name_global
    return names


def _pipeline_chunks(mode, seed, overrides, vpp):
    """This rank's model chunks (one per virtual stage) of the tiny model under PP."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_dsa.model import build_model, model_config

    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        config = model_config("tiny", mdsa_mode=mode, mdsa_kernel="reference", use_cpu_initialization=True, **overrides)
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(build_model("tiny", config, vp_stage=vp_stage, pre_process=first, post_process=last).to(device()))
    return chunks


def pipeline_worker(rank, world, port, layouts, modes, seed, steps):
    """The tiny model (4 layers) under each TP x PP (x virtual PP) layout of ``layouts``
    through megatron-core's pipeline schedules vs one rank through the same loss: per-step LM
    loss (the last stage's), every parameter's first-step gradient (TP-sliced) and the
    parameters after ``steps`` SGD steps, in each phase."""
    init_dist(rank, world, port)
    import patches

    patches.apply_cpu_patches()
    from megatron.core import parallel_state as ps

    from megatron_dsa.parallel import allreduce_sequence_parallel_grads

    B, S, lr = 2, 32, 0.05
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (B, S), generator=g).to(device())
    batches = (tokens, torch.arange(S, device=device())[None].expand(B, -1), tokens.roll(-1, dims=1))
    base = dict(num_layers=4, pipeline_dtype=torch.float32)
    for mode in modes:
        ps.initialize_model_parallel()
        ref = _build(mode, seed, base)
        start = {n: p.detach().clone() for n, p in ref.named_parameters()}
        ref_losses, ref_grads = _pipeline_steps([ref], mode, batches, steps, lr, lambda m: None)
        ref_grads = {n: ref_grads[p] for n, p in ref.named_parameters() if p in ref_grads}
        ref_final = {n: p.detach().clone() for n, p in ref.named_parameters()}
        del ref
        ps.destroy_model_parallel()
        for tp, pp, vpp in layouts:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         virtual_pipeline_model_parallel_size=vpp)
            chunks = _pipeline_chunks(mode, seed, dict(base, tensor_model_parallel_size=tp,
                                                       pipeline_model_parallel_size=pp,
                                                       virtual_pipeline_model_parallel_size=vpp), vpp)
            tp_rank, glu = ps.get_tensor_model_parallel_rank(), chunks[0].config.gated_linear_unit
            names = {p: _global_names(c)[n] for c in chunks for n, p in c.named_parameters()}
            with torch.no_grad():
                for p, n in names.items():
                    p.copy_(_shard(n, start[n], p, tp, tp_rank, glu))
            tp_group = ps.get_tensor_model_parallel_group()
            losses, grads = _pipeline_steps(chunks, mode, batches, steps, lr,
                                            lambda m: allreduce_sequence_parallel_grads(m, tp_group))
            tag = f"rank {rank} {mode} tp={tp} pp={pp} vpp={vpp}"
            if ps.is_pipeline_last_stage():
                assert len(losses) == steps, (tag, losses)
                for got, want in zip(losses, ref_losses):
                    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (tag, losses, ref_losses)
            # Every parameter of this rank's stages that gets a gradient on one rank gets it here.
            assert {names[p] for p in grads} == set(ref_grads) & set(names.values()), tag
            for p, grad in grads.items():
                want = _shard(names[p], ref_grads[names[p]], p, tp, tp_rank, glu)
                err = (grad - want).abs().max().item()
                assert err <= 1e-4 * (want.abs().max().item() + 1e-12) + 1e-7, f"{tag}: grad of {names[p]} off by {err:.3g}"
            for p, n in names.items():
                want = _shard(n, ref_final[n], p, tp, tp_rank, glu)
                if not torch.allclose(p.detach(), want, atol=1e-4, rtol=1e-3):
                    raise AssertionError(f"{tag}: {n} differs after {steps} steps")
            del chunks
            ps.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()
