"""The kernels compile for the H200 (sm_90) and fit its shared memory: the warm-up's fused KL and
the sparse KL's logits kernels at the small MoE's shapes and at DeepSeek-V3.2's (latent 512 + 64
or the MHA form's 128 + 64 a head, 128 heads, indexer 64 x 128), and
the sparse attention / KL target kernels with their default tiles at 16 heads and at 64-head
blocks (the split backward's dq and dkv kernels, the target with the keys as rows; the backward
adding the KL's target as training runs it), their row gathers as 16-byte asynchronous copies;
and the top-k selection with and without a register cap, and the indexer's FP8 scoring; and the
warp-specialised Gluon kernels (the forward, the backward's dkv product and the FP8 scoring: their
partitions' register budgets, 16-byte copies and adds, their products' shapes).

No GPU needed: Triton lowers to PTX and assembles it with its bundled ptxas. The interpreter tests
check the math; this catches what only the compiler sees (an unrolled loop once put 315 KB of
shared memory into a kernel at the 671B shapes: it would not have launched). With
``MDSA_SM90_TRITON`` (a directory holding another Triton) every check compiles with that one too:
compilers differ (Triton 3.6, the GPUs', failed on a loop that 3.8 compiled).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from megatron_dsa.kernels import dense_kl as DK  # noqa: E402
from megatron_dsa.kernels._common import next_pow2, split_pow2  # noqa: E402
from megatron_dsa.kernel_options import KernelOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SM90_SHARED_BYTES = 227 * 1024
POINTERS = dict(QM="*bf16", KV="*bf16", QI="*bf16", KI="*bf16", WI="*fp32", QPOS="*i64", KPOS="*i64", KLIM="*i32",
                QDOC="*i64", KDOC="*i64",
                LSE="*fp32", PART="*fp32", LSEI="*fp32", G="*fp32", DQ="*fp32", DW="*fp32", DK="*fp32",
                scale_log2="fp32", scale="fp32", Q="*bf16", IDX="*i32", O="*bf16", SEG="*i32", DO="*bf16",
                DELTA="*fp32", DKV="*fp32", LSEM="*fp32", P="*fp32", PSUM="*fp32", DS="*bf16",
                KL="*fp32", GKL="*fp32", DQI="*fp32", DKI="*fp32", DWI="*fp32")
# The sparse backward's stored probabilities (P) are bf16 like its score gradients.
STORED_P = ("_sparse_scores_kernel", "_sparse_dkv_product_kernel")


def _compile_sm90(fn, consts: dict, options: dict, hints: bool = False, pointers: dict = None):
    """``hints``: tell the compiler what a launch on contiguous tensors tells it at run time (the
    pointers and strides divisible by 16); without them it cannot vectorise the row gathers.
    ``pointers``: argument types that differ from POINTERS' for this kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    types = dict(POINTERS, **(pointers or {}))
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {}
    if hints:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if n not in consts and (sig[n].startswith("*") or n.startswith("stride") or n.startswith("s_"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def check_fits(H: int, D: int, HI: int, DI: int) -> None:
    DV, D1, DR, D2 = split_pow2(D)
    mains = dict(H=H, DV=DV, D1=D1, DR=DR, D2=D2, IEEE=False, UPCAST=False, HAS_DOC=False)
    lse = DK._lse_blocks(True, D1, D2, 2)
    blk = DK._kl_blocks(HI, True, KernelOptions())
    kl = dict(mains, HI=HI, DI=DI, DIP=DI, IEEE_I=False, **{k: v for k, v in blk.items() if k != "num_warps"})
    kernels = [
        (DK._main_lse_kernel, dict(mains, BM=lse["BM"], BN=lse["BN"]), dict(num_warps=lse["num_warps"],
                                                                            num_stages=lse["num_stages"])),
        (DK._dense_kl_fwd_kernel, kl, dict(num_warps=blk["num_warps"])),
        (DK._dense_kl_bwd_kernel, kl, dict(num_warps=blk["num_warps"])),
    ]
    from megatron_dsa.kernels import indexer_kl as L

    HIP, DIP = next_pow2(HI, 16), next_pow2(DI, 16)
    for fn, bwd in ((L._kl_fwd_kernel, False), (L._kl_bwd_kernel, True)):  # the sparse KL's logits
        tiles = L._kl_tiles(None, True, bwd, HIP * DIP)
        kernels.append((fn, dict(HI=HI, HIP=HIP, DI=DI, DIP=DIP, BK=tiles.BK, IEEE_I=False, UPCAST=False),
                        dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)))
    for fn, consts, options in kernels:
        # With the runtime's alignment hints: they let the compiler pipeline the KV tiles through
        # shared memory (without them the log-sum-exp kernel compiled to 139 KB at three stages
        # and launched at 288 KB on the H200).
        k = _compile_sm90(fn, consts, options, hints=True)
        name = fn.fn.__name__
        assert 0 < k.metadata.shared <= SM90_SHARED_BYTES, (name, k.metadata.shared)
        assert "st.local" not in k.asm["ptx"], f"{name} spills registers to local memory"
        if name == "_dense_kl_bwd_kernel":  # hardware fp32 adds, not a compare-and-swap loop
            assert re.search(r"(red|atom)\.global\.[a-z.]*add[a-z0-9.]*f32", k.asm["ptx"])
            assert "atom.global.cas" not in k.asm["ptx"]
        print(name, k.metadata.shared)


# A directory holding another Triton (``pip install --target DIR triton==...``) to compile every
# check with too: CI gives the one the GPUs run (torch 2.11's 3.6), whose compiler has failed
# on a kernel the installed one compiled.
OTHER_TRITON = os.environ.get("MDSA_SM90_TRITON")


@pytest.fixture(params=[None] + ([OTHER_TRITON] if OTHER_TRITON else []),
                ids=lambda d: "installed_triton" if d is None else "MDSA_SM90_TRITON")
def triton_dir(request):
    """Each check's compiler: the installed Triton, then the one in ``MDSA_SM90_TRITON``."""
    if request.param is not None and not os.path.isdir(os.path.join(request.param, "triton")):
        pytest.fail(f"MDSA_SM90_TRITON={request.param} holds no triton package")
    return request.param


def _compiled_in_a_fresh_process(call: str, triton_dir, timeout: int = 600) -> str:
    """Run ``test_compile_sm90.<call>`` in a fresh process and return what it printed: the compiler
    needs the kernels as JIT functions, and this test session may have them as interpreter
    functions (TRITON_INTERPRET=1, set for the CPU kernel tests). ``triton_dir``: a directory
    whose Triton that process imports instead of the installed one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, env.get("PYTHONPATH")) if p)
    code = f"import sys; sys.path.insert(0, 'tests'); import test_compile_sm90 as t; t.{call}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("H,D,HI,DI", [(8, 160, 4, 64), (128, 576, 64, 128), (128, 192, 64, 128)],
                         ids=["small", "671b", "671b_mha_form"])
def test_kl_kernels_fit_an_h200(H, D, HI, DI, triton_dir):
    out = _compiled_in_a_fresh_process(f"check_fits({H}, {D}, {HI}, {DI})", triton_dir)
    assert out.count("\n") == 5, out


def _pointers(fn) -> dict:
    """The sparse backward's arguments whose types differ from POINTERS' (bf16 stored tensors)."""
    from megatron_dsa.kernels import sparse_attn as A

    if fn is A._sparse_dq_product_kernel:
        return dict(DQ="*bf16")
    return dict(P="*bf16") if fn.fn.__name__ in STORED_P else {}


def check_sparse(HB: int, DV: int = 512, DR: int = 64) -> None:
    """The sparse kernels at one head block with their GPU default tiles, DV + DR / DV dims
    (576 / 512: DeepSeek's and GLM-5's latent; 160 / 128: the small models')."""
    from megatron_dsa.kernels import indexer_kl as L
    from megatron_dsa.kernels import sparse_attn as A

    dims = dict(HB=HB, DV=DV, D1=DV, DR=DR, D2=DR, IEEE=False, UPCAST=False)
    split = A.split_backward(KernelOptions(), HB, DV)
    target = dict(dims, HAS_LSE=True)
    kernels = [(A._sparse_fwd_kernel, dims, A._tiles(None, True, HB, "fwd", DV)),
               (L._target_kernel, target, L._target_tiles(None, True, False, HB))]
    if split:  # dq, then dkv in value quarters; the KL target with the keys as rows above 64 heads
        quarters = dict(HB=HB, DV=DV, DQ4=DV // 4, EXACT=True, DR=DR, D2=DR, IEEE=False, UPCAST=False, PASSES=1)
        keys_rows = {k: v for k, v in target.items() if k != "HB"}
        heads = HB if HB < A.MAX_HEAD_BLOCK else 2 * HB  # the products' heads: all of them (128 at 64-head blocks)
        dq_heads, dq_columns = A.dq_product_blocks(heads, KernelOptions())
        dq_tw, dq_nt = A.dq_product_tiles(dq_columns, DV + DR)
        product = dict(HB=dq_heads, EVEN_K=True, IEEE=False, UPCAST=False)
        tiles_product = A._tiles(None, True, dq_heads, "dq_product")
        dkv_product = dict(HC=heads, PASSES=1, EVEN_K=True, IEEE=False, UPCAST=False)
        tiles_dkv_product = A._tiles(None, True, HB, "dkv_product")
        dkv_tiles = A._tiles(None, True, HB, "dkv")
        # dkv and the one-kernel backward as training launches them: adding the KL's target; the
        # split backward's stored forms (split_bwd): dkv also storing the score gradients, or the
        # kernel storing them and the probabilities, then the dkv and dq products.
        kernels += [(A._sparse_dq_kernel, dims, A._tiles(None, True, HB, "dq")),
                    (A._sparse_dkv_kernel, dict(quarters, HEAD_SUM=True, STORE_DS=False), dkv_tiles),
                    (A._sparse_dkv_kernel, dict(quarters, HEAD_SUM=True, STORE_DS=True), dkv_tiles),
                    (A._sparse_scores_kernel, dict(HN=heads, DV=DV, D=DV + DR, BD=A.SCORES_SLICE, EVEN_D=True,
                                                   IEEE=False, UPCAST=False, HEAD_SUM=True),
                     A._tiles(None, True, HB, "scores")),
                    (A._sparse_dkv_product_kernel,
                     dict(dkv_product, COL0=0, NCOL=DV, BC=A.DKV_PRODUCT_COLUMNS, HAS_DO=True), tiles_dkv_product),
                    (A._sparse_dkv_product_kernel, dict(dkv_product, COL0=DV, NCOL=DR, BC=DR, HAS_DO=False),
                     tiles_dkv_product),
                    (A._sparse_dq_product_kernel, dict(product, D=DV + DR, TW=dq_tw, NT=dq_nt), tiles_product),
                    (L._target_keys_kernel, dict(keys_rows, HN=L.KEYS_ROWS_HEADS), L._target_tiles(None, True, True, HB))]
    if HB < A.MAX_HEAD_BLOCK:  # the one-kernel backward: the default on a narrow latent, or when set
        kernels.append((A._sparse_bwd_kernel, dict(dims, PASSES=8, FIRST=False, HEAD_SUM=True),
                        A._tiles(None, True, HB, "bwd", DV)))
    for fn, consts, tiles in kernels:
        k = _compile_sm90(fn, dict(consts, BK=tiles.BK), dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
                          hints=True, pointers=_pointers(fn))
        name = fn.fn.__name__
        ptx = k.asm["ptx"]
        assert 0 < k.metadata.shared <= SM90_SHARED_BYTES, (name, k.metadata.shared)
        if tiles.num_stages > 1:  # the gathered rows are pipelined as 16-byte asynchronous copies
            assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10", ptx), name
        print(name, k.metadata.shared)


@pytest.mark.parametrize("HB,DV,DR", [(16, 512, 64), (64, 512, 64), (16, 128, 32)],
                         ids=["16_heads", "64_head_blocks", "16_heads_narrow_latent"])
def test_sparse_kernels_fit_an_h200(HB, DV, DR, triton_dir):
    out = _compiled_in_a_fresh_process(f"check_sparse({HB}, {DV}, {DR})", triton_dir, timeout=900)
    assert out.count("\n") == {64: 10, 16: 11 if DV > 128 else 3}[HB], out


def check_selection() -> None:
    """The top-k selection at its default launch, with the compiler's registers and with
    ``select_max_registers`` 64 (the PTX then carries the cap; the kernel spills instead), with
    5-bit digits (a last digit of 2 bits) and the path counts, and with every combination of
    its bounds (the guess, the runs' maxima, the sampled bound; Triton 3.6 once failed to
    compile the kernel without the last two); the lists with their keys' scores (values) in
    two of them."""
    from megatron_dsa.kernels import indexer as I

    sel = I.SELECT_TILES
    pointers = dict(S="*fp32", OUT="*i32", RLIM="*i32", CAND="*i32", GMAX="*fp32", RUNS="*i32", GSTAT="*fp32",
                    ZIN="*fp32", ZOUT="*fp32", PATHS="*i32", margin="fp32")
    D, S, G = I.SELECT_DIGIT_BITS, I.SELECT_SAMPLE, I.SELECT_RUNS
    for bits, cap, sample, runs, guess, count, values in (
            (D, None, S, G, True, False, False), (D, 64, S, G, True, False, True), (5, None, S, G, True, True, False),
            (D, None, 0, G, True, False, False), (D, None, S, G, False, False, False),
            (D, None, S, 0, False, False, False), (D, None, 0, 0, False, False, True)):
        consts = dict(TOPK=2048, TILE=sel.BK, OTILE=1024, CAP=I.SELECT_CAP, G=runs,
                      RT=sel.BK // max(runs, 1), BITS=bits, TOPD=I.select_top_digits(bits), SAMPLE=sample,
                      RANK=I.select_sample_rank(2048, sample) if sample else 0, GUESS=guess, COUNT=count,
                      VALUES=values)
        options = dict(num_warps=sel.num_warps, num_stages=sel.num_stages, **({} if cap is None else {"maxnreg": cap}))
        k = _compile_sm90(I._select_kernel, consts, options, hints=True, pointers=pointers)
        caps = re.findall(r"\.maxnreg (\d+)", k.asm["ptx"])
        assert caps == ([] if cap is None else [str(cap)]), caps
        assert 0 < k.metadata.shared <= SM90_SHARED_BYTES
        print("_select_kernel", bits, cap, sample, runs, guess, count, values, k.metadata.shared)


def test_selection_compiles_with_and_without_a_register_cap(triton_dir):
    assert _compiled_in_a_fresh_process("check_selection()", triton_dir).count("_select_kernel") == 7


def _compile_gluon_sm90(fn, consts: dict, pointers: dict, aligned: tuple, regs: tuple) -> str:
    """A Gluon kernel compiled for sm_90 as a launch on contiguous tensors sees it (``aligned``:
    the integer arguments known divisible by 16): it fits the shared memory and its partitions
    take the register budgets ``regs`` (setmaxnreg); returns its PTX."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental import gluon
    from megatron_dsa.kernels import sparse_attn_ws as W

    names = fn.arg_names
    types = dict(POINTERS, **pointers)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in aligned}
    src = gluon._runtime.GluonASTSource(fn=fn, signature=sig, attrs=attrs,
                                        constexprs={(names.index(n),): v for n, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, maxnreg=W.LAUNCH_REGS))
    ptx = k.asm["ptx"]
    assert 0 < k.metadata.shared <= SM90_SHARED_BYTES
    found = set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))
    assert {str(r) for r in regs} <= found, found
    print(fn.__name__, k.metadata.shared, sorted(found))
    return ptx


# what a launch on contiguous tensors with top-k 2048 tells the compiler
GLUON_ALIGNED = ("TOPK", "s_qb", "s_qs", "s_qh", "s_kb", "s_ks", "s_ob", "s_os", "s_oh", "s_ib", "s_is", "s_gb",
                 "s_gs", "s_gh", "s_dkb", "s_dks")


def check_sparse_forward_ws() -> None:
    """The warp-specialised Gluon forward at DeepSeek-V3.2's latent (576 = 9 tiles of 64): its
    gathers are 16-byte copies, its output products m64n256."""
    from megatron_dsa.kernels import sparse_attn_ws as W

    consts = dict(NT=9, PRODUCER_WARPS=4, WG1_REGS=W.CONSUMER_REGS, PRODUCER_REGS=W.PRODUCER_REGS)
    ptx = _compile_gluon_sm90(W._sparse_fwd_ws_kernel, consts, {}, GLUON_ALIGNED, (W.CONSUMER_REGS, W.PRODUCER_REGS))
    assert "cp.async.cg.shared.global" in ptx and "wgmma.mma_async.sync.aligned.m64n256k16" in ptx


def check_dkv_product_ws() -> None:
    """The Gluon dkv product's two launches: the value columns in pairs of 128-column blocks with
    dO's term and key ranges, the rope columns without dO, and the value launch at 32 and 16
    heads; their 16-byte adds from a shared copy of the products."""
    from megatron_dsa.kernels import sparse_attn_ws as W

    for col0, BC, has_do, HP, passes, (nq, nbuf, consumer_regs, producer_regs) in (
            (0, 128, True, 128, 4, W.DKV_VALUE_PIPELINE), (512, 64, False, 128, 4, W.DKV_ROPE_PIPELINE),
            (0, 128, True, 32, 1, W.DKV_VALUE_PIPELINE), (0, 128, True, 16, 1, W.DKV_VALUE_PIPELINE)):
        consts = dict(COL0=col0, BC=BC, HP=HP, HAS_DO=has_do, PASSES=passes, NQ=nq, NBUF=nbuf, PAIRS=has_do,
                      CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs)
        ptx = _compile_gluon_sm90(W._sparse_dkv_product_ws_kernel, consts, dict(P="*bf16", DS="*bf16", SEG="*i32"),
                                  GLUON_ALIGNED + ("n_work",), (consumer_regs, producer_regs))
        assert f"wgmma.mma_async.sync.aligned.m64n{BC}k16" in ptx and "cp.async.cg.shared.global" in ptx
        assert "atom.global.gpu.relaxed.add.v4.f32" in ptx and "atom.global.gpu.relaxed.add.v2.f32" not in ptx


@pytest.mark.parametrize("check,kernel,count", [
    ("check_sparse_forward_ws()", "_sparse_fwd_ws_kernel", 1),
    ("check_dkv_product_ws()", "_sparse_dkv_product_ws_kernel", 4),
])
def test_gluon_kernels_compile(check, kernel, count, triton_dir):
    pytest.importorskip("triton.experimental.gluon")
    assert _compiled_in_a_fresh_process(check, triton_dir).count(kernel) == count


def check_scoring() -> None:
    """The indexer's FP8 scoring at its default launch for the small MoE's 4 x 64 indexer and
    DeepSeek-V3.2's 64 x 128, with the per-block bounds of its causal skip and unmasked tiles
    and the run maxima's moments (what the selection's guessed bound takes)."""
    from megatron_dsa.kernels import indexer as I

    cfg = I.SCORE_CFG["fp8"]
    pointers = dict(Q="*fp8e4nv", K="*fp8e4nv", W="*fp32", KS="*fp32", OUT="*fp32", GMAX="*fp32", GSTAT="*fp32",
                    BLIM="*i32", BLO="*i32", BFULL="*i32")  # the positions and documents as in POINTERS
    for HI, DI in ((4, 64), (64, 128)):
        consts = dict(HI=HI, DI=DI, DIP=DI, BM=cfg["BM"], BN=cfg["BN"], HAS_KS=True, IEEE=False, UPCAST=False,
                      HAS_DOC=False, G=I.SELECT_RUNS, STATS=True)
        k = _compile_sm90(I._score_kernel, consts, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                          hints=True, pointers=pointers)
        assert 0 < k.metadata.shared <= SM90_SHARED_BYTES
        print("_score_kernel", HI, DI, k.metadata.shared)


def test_scoring_compiles_for_both_indexer_shapes(triton_dir):
    assert _compiled_in_a_fresh_process("check_scoring()", triton_dir).count("_score_kernel") == 2
