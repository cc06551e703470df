"""Small helpers shared by the math tests."""

from __future__ import annotations

import torch

F64 = torch.float64


def rand(*shape, dtype=F64, requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def key_ordered_selection(B, S, K, n_keys, gen, causal=False):
    """Rows of distinct keys < n_keys (causal: <= the row) in ascending order, each a random
    length (0 .. K) with the -1 padding last, as the indexer's unordered top-k lists them."""
    idx = torch.full((B, S, K), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(S):
            pool = t + 1 if causal else n_keys
            n = int(torch.randint(0, min(K, pool) + 1, (), generator=gen))
            idx[b, t, :n] = torch.randperm(pool, generator=gen)[:n].sort().values.to(torch.int32)
    return idx


def set_indexer_loss_scale(value: float, device=None) -> None:
    """Set megatron-core's indexer-loss backward scale the way its pipeline schedule does: a
    one-element tensor. The first call fixes the stored tensor's shape for the whole process
    (later calls copy into it), so every test must use the schedule's shape."""
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

    DSAIndexerLossAutoScaler.set_loss_scale(torch.full((1,), float(value), device=device))


def tiny_lm_forward(saved: list, device="cpu", **overrides):
    """The tiny model (``model_config("tiny", **overrides)``, seed 5) on ``device`` and one LM
    forward of a fixed [2, 64] batch, every tensor its autograd graph saves appended to ``saved``:
    (model, summed loss)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron_dsa.model import build_model, model_config

    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    model = build_model("tiny", model_config("tiny", **overrides)).to(device)
    model.train()
    S = 64
    tokens = torch.randint(0, 512, (2, S), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(tokens, torch.arange(S, device=device)[None].expand(2, -1), None,
                     labels=tokens.roll(-1, 1)).sum()
    return model, loss


def skip_repeated_interpreter_patching() -> None:
    """Make Triton's interpreter stop re-patching ``triton.language`` at every device-function call.

    Without CUDA the kernels run through Triton's interpreter. Each kernel launch patches the
    language's builtins once for the whole grid (``GridExecutor.__call__``: ``_patch_lang``,
    restored when the launch ends), and then every call of a ``@triton.jit`` helper inside the
    kernel (``InterpretedFunction.__call__``) patches them again: ``inspect.getmembers`` over
    ``triton.language`` and ``tl.tensor`` each time, half of the time of the top-k tests. That
    second patching changes nothing: the builtins are already replaced (a replaced member is no
    longer a builtin, so it is skipped), the rest is set to equal values, and its scope is never
    restored (the launch's restore brings back the originals). So a helper whose language modules
    the running launch has patched already skips it; any other case runs Triton's own code.
    Idempotent; does nothing if this Triton's interpreter is laid out differently, or with
    MDSA_TRITON_REPATCH=1 in the environment (Triton's own behaviour, to compare)."""
    import inspect
    import os

    if os.environ.get("MDSA_TRITON_REPATCH") == "1":
        return

    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:  # no Triton, or one whose interpreter cannot be imported
        return
    if getattr(interp, "_mdsa_skip_repeated_patching", False):
        return
    if not all(hasattr(interp, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return
    patch_lang, launch = interp._patch_lang, interp.GridExecutor.__call__
    state = {"launches": 0, "patched": set()}  # running launches; the language modules they patched
    langs = {}  # function -> the language modules its globals hold (as Triton's _patch_lang finds them)

    def langs_of(fn) -> set:
        if fn not in langs:
            langs[fn] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        return langs[fn]

    def patch_lang_once(fn):
        mine = langs_of(fn)
        if state["launches"] and state["patched"] and mine <= state["patched"]:
            return interp._LangPatchScope()  # a helper inside a launch: already patched
        scope = patch_lang(fn)
        if state["launches"]:
            state["patched"] |= mine
        return scope

    def tracked_launch(self, *args, **kwargs):
        state["launches"] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["launches"] -= 1
            if not state["launches"]:
                state["patched"].clear()

    interp._patch_lang = patch_lang_once
    interp.GridExecutor.__call__ = tracked_launch
    interp._mdsa_skip_repeated_patching = True


def check_topk(got, ref, scores, mask, tol):
    """Same sets per row up to near-ties at the threshold; -1 counts equal; order descending."""
    assert got.shape == ref.shape and got.dtype == ref.dtype == torch.int32
    B, Sq, k = got.shape
    masked = scores.masked_fill(~mask, float("-inf"))
    for b in range(B):
        for t in range(Sq):
            g, r = got[b, t], ref[b, t]
            assert int((g < 0).sum()) == int((r < 0).sum()), (b, t)
            assert bool((g[: int((g >= 0).sum())] >= 0).all()), "-1 must trail"
            gs, rs = set(g[g >= 0].tolist()), set(r[r >= 0].tolist())
            assert len(gs) == int((g >= 0).sum()), "duplicate index"
            if gs != rs:
                row = masked[b, t]
                thr = row[r[r >= 0]].min()
                diff = torch.tensor(sorted(gs ^ rs))
                assert bool(mask[t, diff].all()), "ineligible key selected"
                assert float((row[diff] - thr).abs().max()) <= tol * (1 + abs(float(thr))), (b, t)
            v = masked[b, t, g[g >= 0]]
            assert bool((v[1:] <= v[:-1] + tol * (1 + v.abs().max())).all()), "not score-descending"
