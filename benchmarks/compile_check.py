"""Compile every kernel for sm_90 on a machine WITHOUT a GPU (Triton AST -> PTX -> cubin with the
bundled ptxas), to catch compiler-only errors the interpreter accepts, and list atomics / local
spills.  Not a test.  Usage: python benchmarks/compile_check.py [score select fwd bwd klf klb csr dkl]"""

import triton, triton.language as tl, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_dsa.kernels import indexer as I, sparse_attn as A, indexer_kl as L, _csr as CS, dense_kl as DK
from megatron_dsa.kernels._common import split_pow2
tgt = GPUTarget("cuda", 90, 32)
def comp(fn, sig, const, **opt):
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    k = triton.compile(src, target=tgt, options=opt)
    md = k.metadata
    print(fn.fn.__name__ if hasattr(fn,'fn') else fn, 'ok', 'shared', md.shared, 'nregs?', getattr(k,'n_regs',None))
    import re, collections
    ptx=k.asm['ptx']; c=collections.Counter(re.findall(r'\b((?:atom|red)\.global\S*)', ptx)); print('   atomics:', dict(c), 'st.local', ptx.count('st.local'))
    return k
def sig_of(fn, types):
    names = fn.arg_names
    return {n: types.get(n, 'i32') for n in names}
def run(fn, ptrs, consts, opt):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts: sig[n] = 'constexpr'
        elif n in ptrs: sig[n] = ptrs[n]
        else: sig[n] = 'i32'
    c = {(names.index(n),): v for n, v in consts.items()}
    return comp(fn, sig, c, **opt)
import sys
which = sys.argv[1:] or ['score','select','fwd','bwd','klf','klb','csr','dkl']
if 'score' in which:
  for dt, ieee in (('*bf16',False),('*fp8e4nv',False)):
    run(I._score_kernel, dict(Q=dt,K=dt,W='*fp32',KS='*fp32',OUT='*fp32',BLIM='*i32',QPOS='*i64',KPOS='*i64'),
        dict(HI=64,DI=128,DIP=128,BM=64,BN=256,HAS_KS=(dt=='*fp8e4nv'),IEEE=ieee,UPCAST=False), dict(num_warps=8,num_stages=3))
  run(I._fp8_quantize_kernel, dict(X='*bf16',Y='*fp8e4nv',SC='*fp32'), dict(D=128,DP=128,R=32,AMAX_MIN=1e-4,FMAX=448.0,INV_FMAX=1/448), dict(num_warps=4))
if 'select' in which:
  run(I._select_kernel, dict(S='*fp32',OUT='*i64',RLIM='*i32',CAND='*i32'), dict(TOPK=2048,TILE=2048,OTILE=1024,CAP=4096), dict(num_warps=8))
if 'fwd' in which:
  run(A._sparse_fwd_kernel, dict(Q='*bf16',KV='*bf16',IDX='*i64',O='*bf16',LSE='*fp32',scale_log2='fp32'),
      dict(H=16,HP=16,DV=512,D1=512,DR=64,D2=64,BK=64,IEEE=False,UPCAST=False), dict(num_warps=4,num_stages=2))
if 'bwd' in which:
  for srt in (True, False):
    run(A._sparse_bwd_kernel, dict(Q='*bf16',KV='*bf16',IDX='*i64',DO='*bf16',LSE='*fp32',DELTA='*fp32',DQ='*bf16',DKV='*fp32',
                                   POS=('*i32' if srt else '*i64'),PART=('*bf16' if srt else '*fp32'),scale='fp32',scale_log2='fp32'),
      dict(H=16,HP=16,DV=512,D1=512,DR=64,D2=64,BK=32,IEEE=False,UPCAST=False,ATOMIC=0,DS_3XTF32=False,SORTED=srt), dict(num_warps=8,num_stages=2))
if 'klf' in which:
  for hl, mode in ((True, 0), (False, 0), (True, 1), (False, 2)):
    run(L._sparse_kl_fwd_kernel, dict(QM='*bf16',KV='*bf16',QI='*bf16',KI='*bf16',WI='*fp32',IDX='*i64',KL='*fp32',P='*fp32',LSEI='*fp32',LSEM='*fp32',scale_log2='fp32'),
      dict(H=16,HP=16,DV=512,D1=512,DR=64,D2=64,HI=64,HIP=64,DI=128,DIP=128,BK=32,IEEE=False,IEEE_I=False,UPCAST=False,HAS_LSE=hl,MODE=mode), dict(num_warps=4,num_stages=2))
if 'klb' in which:
  for srt in (True, False):
    run(L._sparse_kl_bwd_kernel, dict(QI='*bf16',KI='*bf16',WI='*fp32',IDX='*i64',P='*fp32',LSEI='*fp32',GKL='*fp32',DQI='*bf16',DKI='*fp32',DWI='*fp32',
                                      POS=('*i32' if srt else '*i64'),PART=('*bf16' if srt else '*fp32')),
      dict(HI=64,HIP=64,DI=128,DIP=128,BK=64,IEEE_I=False,UPCAST=False,ATOMIC=0,DS_3XTF32=False,SORTED=srt), dict(num_warps=4,num_stages=2))
if 'csr' in which:
  run(CS._csr_count_kernel, dict(IDX='*i64',CNT='*i32'), dict(BLK=1024), dict(num_warps=4))
  run(CS._csr_pos_kernel, dict(IDX='*i64',CUR='*i32',OFFS='*i32',POS='*i32'), dict(BLK=1024), dict(num_warps=4))
  for D in (576, 128):
    DA, D1, DB, D2 = split_pow2(D)
    run(CS._seg_reduce_kernel, dict(PART='*bf16',OFFS='*i32',OUT='*fp32'),
        dict(D=D,DA=DA,D1=D1,DB=DB,D2=D2,KB=CS.REDUCE_KB,R=CS.REDUCE_R), dict(num_warps=(4 if D1 + D2 > 128 else 2)))
if 'dkl' in which:
  # The warm-up's fused dense KL at the small model's shapes (H=8, D=128+32, indexer 4 x 64: one
  # folded group) and at the 671B shapes (H=128 per rank at TP=1, D=512+64, indexer 64 x 128:
  # several groups), with the GPU block sizes of dense_kl._kl_blocks.
  ptr = dict(QM='*bf16',KV='*bf16',QI='*bf16',KI='*bf16',WI='*fp32',QPOS='*i64',KPOS='*i64',KLIM='*i32',LSE='*fp32',
             PART='*fp32',LSEI='*fp32',G='*fp32',DQ='*fp32',DW='*fp32',DK='*fp32',scale_log2='fp32')
  for H, D, HI, DI in ((8, 160, 4, 64), (128, 576, 64, 128)):
    DV, D1, DR, D2 = split_pow2(D)
    lblk = DK._lse_blocks(True)
    lopt = {k: lblk.pop(k) for k in ('num_warps', 'num_stages') if k in lblk}
    run(DK._main_lse_kernel, ptr, dict(H=H,DV=DV,D1=D1,DR=DR,D2=D2,IEEE=False,UPCAST=False,**lblk), lopt)
    blk = DK._kl_blocks(HI, True)
    opt = {k: blk.pop(k) for k in ('num_warps', 'num_stages') if k in blk}
    print('   blocks', blk, opt)
    c = dict(H=H,DV=DV,D1=D1,DR=DR,D2=D2,HI=HI,DI=DI,DIP=DI,IEEE=False,IEEE_I=False,UPCAST=False,**blk)
    run(DK._dense_kl_fwd_kernel, ptr, c, opt)
    run(DK._dense_kl_bwd_kernel, ptr, dict(c, ATOMIC=2), opt)
