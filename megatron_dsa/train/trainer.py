"""The three DSA training phases on Megatron-LM's own loop (``megatron.training.pretrain``).

Users get Megatron's flags, log line, torch_dist checkpointing, evaluation and TensorBoard.
This plugin supplies the model provider (our GPTModel + DSA block spec, with the phase's
freezing), the dataset provider (``megatron_dsa.data``), the forward step (the phase's loss)
and Megatron's argv with a few ``--mdsa-*`` flags (``megatron_dsa.train.flags``).

Phases (the DeepSeek-V3.2-Exp report's dense warm-up and sparse training, after pretraining):

    pretrain  mdsa_mode=dense; LM loss; the indexer gets no gradient in dense mode, so it is
              left out of the optimizer (weight decay would otherwise shrink it).
    warmup    dense attention; every parameter but the indexers frozen (requires_grad False,
              the optimizer holds only indexer parameters, the router's expert bias frozen);
              loss = sum of the per-layer indexer KL (``pop_indexer_losses``); the LM loss is
              computed for logging only and nothing backpropagates through the main model.
    sparse    top-k attention; all parameters; LM loss, and the sparse indexer KL computed in
              the attention's backward, scaled by megatron-core's DSAIndexerLossAutoScaler loss
              scale (its per-layer values are logged after the step).

Each phase saves into its own ``checkpoint.save``. It resumes from there when a checkpoint
exists (model + optimizer + iteration + RNG); otherwise it starts from ``checkpoint.load_from``
(the previous phase, or a checkpoint ``from-hf`` imported) with weights only: Megatron's ``--load`` + ``--pretrained-checkpoint``
(``--finetune`` semantics: fresh optimizer, iteration 0).

Non-finite values: every microbatch's loss terms (LM loss, each layer's indexer KL, MoE
auxiliary losses) are checked before the backward; the first non-finite one stops the run
with ``NonFiniteError`` naming the iteration and the first decoder layer whose output went
non-finite (or the loss term). Megatron's own gradient check runs with its rerun machine
disabled, so a non-finite gradient also stops before the optimizer step. Nothing of the bad
iteration is saved; the last checkpoint stays the latest, and ``train.skip_iterations`` makes
a resumed run step over the bad batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from typing import Any

import torch

from megatron_dsa.train.config import RunConfig
from megatron_dsa.train.flags import add_mdsa_args, megatron_argv, phase_model_config

# Filled by run() / the --mdsa-* flags; read by the providers (Megatron calls them without
# any context of ours).
_STATE: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# Providers


def _args():
    from megatron.training import get_args

    return get_args()


def freeze_for_phase(model: torch.nn.Module, phase: str) -> None:
    """requires_grad per phase (before DDP wraps the model, so the optimizer sees only these)."""
    from megatron_dsa.model import indexer_parameters

    indexer = {id(p) for p in indexer_parameters(model)}
    for param in model.parameters():
        is_indexer = id(param) in indexer
        if phase == "pretrain":
            param.requires_grad_(not is_indexer)
        elif phase == "warmup":
            param.requires_grad_(is_indexer)
        else:
            param.requires_grad_(True)
    if phase == "warmup":
        # The router's expert bias is a buffer that finalize_model_grads updates every step.
        for module in model.modules():
            if hasattr(module, "frozen_expert_bias"):
                module.frozen_expert_bias = True


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron_dsa.model import build_model

    args = _args()
    cfg = phase_model_config(args)
    model = build_model(
        args.mdsa_size, cfg, vocab_size=args.padded_vocab_size, max_seq_len=args.seq_length,
        pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
    )
    freeze_for_phase(model, args.mdsa_phase)
    watch_finite_outputs(model)
    _STATE["model_config"] = cfg
    _STATE["model"] = model
    return model


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    from megatron_dsa.data import build_gpt_datasets, load_tokenizer

    args = _args()
    tokenizer = load_tokenizer(args.mdsa_data_dir)
    train, valid = build_gpt_datasets(
        args.mdsa_data_dir, args.seq_length, answer_loss_weight=args.mdsa_answer_loss_weight,
        tokenizer=tokenizer, random_seed=args.seed,
        train_samples=train_val_test_num_samples[0], valid_samples=train_val_test_num_samples[1],
        is_built_on_rank=lambda: True,
    )
    return train, valid, None


train_valid_test_datasets_provider.is_distributed = True


def _batch(data_iterator):
    batch = next(data_iterator)
    tokens = batch["tokens"].long()
    labels = batch["labels"].long()
    loss_mask = batch["loss_mask"].float()
    position_ids = batch["position_ids"].long()
    if torch.cuda.is_available():
        tokens, labels, loss_mask, position_ids = (
            t.cuda(non_blocking=True) for t in (tokens, labels, loss_mask, position_ids)
        )
    return tokens, labels, loss_mask, position_ids


def _pop_layer_metrics(keep: bool = False) -> dict[str, torch.Tensor]:
    """Per-layer indexer KL / top-k recall recorded by the layers in the last forward, removed
    from megatron-core's MoE metrics tracker (its report() would clear them unlogged); ``keep``
    leaves them there (``layer_metrics_after_step`` reports them after the step)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_dsa.layer import INDEXER_KL, TOPK_RECALL

    out = {}
    metrics = get_moe_metrics_tracker().metrics
    for name in (INDEXER_KL, TOPK_RECALL):
        entry = metrics.get(name)
        if entry is None:
            continue
        out[name] = entry.values.detach().clone()
        if not keep:
            entry.values.zero_()
    return out


def _layer_report(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Log entries of per-layer metrics: the mean over the layers that recorded and each of
    them ("indexer kl", "indexer kl/layer3", ...)."""
    report = {}
    for name, values in metrics.items():
        tag = name.replace("indexer_", "indexer ").replace("_", "-")
        # Layers that reuse another layer's selection (dsa_indexer_topk_freq) record nothing:
        # their slots stay 0 and must not dilute the mean (a recorded KL or recall is > 0).
        recorded = values != 0
        if not recorded.any():
            continue
        report[tag] = values[recorded].mean()
        for i in recorded.nonzero().reshape(-1).tolist():
            report[f"{tag}/layer{i + 1}"] = values[i]
    return report


def metrics_after_step(args=None) -> bool:
    """Whether the indexer's per-layer metrics of a training step are read after it, not by the
    loss function: under pipeline parallelism (only the last stage runs the loss function) and
    in the sparse phase (the attention's backward computes and records the KL)."""
    args = args or _args()
    return args.pipeline_model_parallel_size > 1 or args.mdsa_phase == "sparse"


def layer_metrics_after_step() -> dict[str, torch.Tensor]:
    """The indexer metrics of a training step, of EVERY pipeline stage's layers, for the log
    (``metrics_after_step``); a non-finite one stops the run before the step is saved.

    Each stage's layers record into that stage's tracker, in their forward or (the sparse KL)
    their backward: the per-layer sums over the iteration's microbatches are added over the
    pipeline group, as megatron-core reduces its MoE metrics, then averaged over microbatches
    and data-parallel ranks. Every pipeline rank calls this once per logged iteration."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_dsa.layer import INDEXER_KL, TOPK_RECALL

    tracker = get_moe_metrics_tracker()
    metrics = {}
    for name in (INDEXER_KL, TOPK_RECALL):
        # A stage that recorded nothing still joins the collective with zeros of the same size.
        tracker.ensure_initialized(name, _args().num_layers)
        values = tracker.metrics[name].values
        torch.distributed.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        values /= get_num_microbatches()
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group(),
                                     op=torch.distributed.ReduceOp.AVG)
        metrics[name] = values.clone()
        values.zero_()
    labels = {INDEXER_KL: "the indexer KL", TOPK_RECALL: "the indexer top-k recall"}
    check_finite([(labels[name], v) for name, v in metrics.items()], training=True)
    return _layer_report(metrics)


def _log_every_stage(training_log):
    """Megatron's training_log (called by every rank after each step), with the indexer
    metrics read after the step (``metrics_after_step``) in its loss dict."""

    def log(loss_dict, *args, **kwargs):
        if metrics_after_step():
            loss_dict = {**loss_dict, **layer_metrics_after_step()}
        return training_log(loss_dict, *args, **kwargs)

    return log


def _wrap_once(module, name: str, wrap) -> None:
    """module.name = wrap(module.name), unless an earlier run in this process already did."""
    fn = getattr(module, name)
    if getattr(fn, "_mdsa_wrapped_by", None) is not wrap:
        wrapped = wrap(fn)
        wrapped._mdsa_wrapped_by = wrap
        setattr(module, name, wrapped)


def _drop_validation_metrics(evaluate):
    """Megatron's evaluate, after which the indexer metrics its forwards recorded are dropped.
    The last stage's loss function reports what it can; under pipeline parallelism the other
    stages' records would otherwise be added to the next training step's (the tracker sums)."""

    def run(*args, **kwargs):
        try:
            return evaluate(*args, **kwargs)
        finally:
            _pop_layer_metrics()

    return run


class NonFiniteError(RuntimeError):
    """A loss term, an activation or a gradient went NaN/inf; raised before the step."""


# (layer number, isfinite(output).all()) of each decoder layer in the current forward: reduced
# on the device without a sync, read only when a loss term is non-finite.
_LAYER_FINITE: list[tuple[int, torch.Tensor]] = []


def watch_finite_outputs(model: torch.nn.Module) -> None:
    """Record whether each decoder layer's output is finite (forward hooks, no sync)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    def hook(module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        # megatron-core numbers an MTP layer from 1 within its block: it comes after the decoder.
        number = module.layer_number + (module.config.num_layers if module.is_mtp_layer else 0)
        if isinstance(out, torch.Tensor):
            _LAYER_FINITE.append((number, torch.isfinite(out.detach()).all()))

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            module.register_forward_hook(hook)


def _where(training: bool | None = None) -> str:
    try:
        args = _args()
    except AssertionError:  # Megatron's globals are not set up (a forward outside its loop)
        return "this step"
    # Megatron's 1-based numbering (its log, --iterations-to-skip); evaluation runs after the
    # iteration's step, before the next one sets curr_iteration.
    step = getattr(args, "curr_iteration", 0) + 1
    return f"validation after iteration {step}" if training is False else f"iteration {step}"


def _label(name: str, values: torch.Tensor) -> str:
    """``name``, or for a per-layer vector ``name of layer N`` with N its first non-finite slot."""
    if values.dim() == 0:
        return name
    bad = (~torch.isfinite(values)).nonzero()
    return f"{name} of layer {int(bad[0]) + 1}" if len(bad) else name


def check_finite(terms: list[tuple[str, torch.Tensor]], training: bool | None = None) -> None:
    """One sync for all loss terms (a 1-d term holds one value per layer); on a non-finite one,
    raise NonFiniteError naming the iteration and the first decoder layer whose output was
    non-finite, else the term."""
    if not terms:
        return
    if bool(torch.stack([torch.isfinite(t.detach()).all() for _, t in terms]).all()):
        return
    first_layer = next((n for n, ok in sorted(_LAYER_FINITE, key=lambda x: x[0]) if not bool(ok)), None)
    bad = [_label(name, t.detach()) for name, t in terms if not bool(torch.isfinite(t.detach()).all())]
    where = _where(training)
    if first_layer is not None:
        what = f"the output of decoder layer {first_layer} went non-finite first ({', '.join(bad)} non-finite)"
    else:
        what = f"{bad[0]} is non-finite" + (f" (also {', '.join(bad[1:])})" if len(bad) > 1 else "")
    raise NonFiniteError(f"{where}: {what}")


def _moe_aux_terms() -> list[tuple[str, torch.Tensor]]:
    """Per-layer values megatron-core's MoE metrics tracker holds (the routers' auxiliary
    losses; the indexer's entries are popped by _pop_layer_metrics)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    terms = []
    for name, entry in get_moe_metrics_tracker().metrics.items():
        values = getattr(entry, "values", None)
        if isinstance(values, torch.Tensor):
            terms.append((f"MoE {name}", values))
    return terms


def loss_func(loss_mask: torch.Tensor, model, phase: str, output_tensor: torch.Tensor):
    """(loss, num_tokens, report) in Megatron's per-token form. ``report`` values are
    [sum, count] pairs that Megatron averages over microbatches and data-parallel ranks."""
    from megatron.core import parallel_state

    from megatron_dsa.layer import pop_indexer_losses

    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    num_tokens = mask.sum()
    lm_sum = (losses * mask).sum()
    pair = lambda value: torch.stack([value.detach().float() * num_tokens, num_tokens])  # noqa: E731
    report = {}
    terms = [("the LM loss", lm_sum)]
    if phase == "warmup" and model.config.pipeline_model_parallel_size > 1:
        # Every stage's KL is attached to its layers' outputs (the last stage's loss cannot
        # reach the others): a zero LM term carries the schedule's backward through them.
        loss = lm_sum * 0.0
        report["lm loss"] = torch.stack([lm_sum.detach(), num_tokens])
    elif phase == "warmup":
        indexer_losses = pop_indexer_losses(model)
        if not indexer_losses:
            raise RuntimeError("warmup forward produced no indexer loss (is mdsa_mode 'warmup'?)")
        # Each TP x CP rank holds its share of the KL (its own rows; the shares add up to the
        # one-rank value). Megatron averages gradients and this report over DP x CP, so the share
        # is scaled by CP (as its schedule scales the indexer loss it routes); the report adds
        # the TP ranks' shares.
        kl = torch.stack(indexer_losses).sum()
        terms.append(("the indexer KL", torch.stack(indexer_losses).detach()))
        cp = parallel_state.get_context_parallel_world_size()
        loss = kl * cp * num_tokens  # per token: Megatron divides by num_tokens
        kl_report = kl.detach() * cp
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(kl_report, group=parallel_state.get_tensor_model_parallel_group())
        report["indexer loss"] = pair(kl_report)
        report["lm loss"] = torch.stack([lm_sum.detach(), num_tokens])
    else:
        loss = lm_sum
        report["lm loss"] = torch.stack([lm_sum.detach(), num_tokens])
    # Under pipeline parallelism the tracker keeps them: every stage's are logged together
    # after the step (layer_metrics_after_step), not only this last stage's. So does a sparse
    # training step's: its KL is recorded by the backward, after this function.
    pipelined = getattr(getattr(model, "config", None), "pipeline_model_parallel_size", 1) > 1
    after_step = pipelined or (phase == "sparse" and bool(getattr(model, "training", False)))
    metrics = _pop_layer_metrics(keep=after_step)
    from megatron_dsa.layer import INDEXER_KL

    if INDEXER_KL in metrics:
        terms.append(("the indexer KL", metrics[INDEXER_KL]))
    terms += _moe_aux_terms()
    check_finite(terms, training=getattr(model, "training", None))
    if not after_step:
        report.update({tag: pair(value) for tag, value in _layer_report(metrics).items()})
    return loss, num_tokens.int(), report


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    from megatron.core.utils import get_attr_wrapped_model, unwrap_model
    from megatron.training import get_timers

    args = _args()
    if get_attr_wrapped_model(model, "training"):
        _PROGRESS.tick(args)
    _LAYER_FINITE.clear()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, position_ids = _batch(data_iterator)
    packed_seq_params = None
    if args.mdsa_packed:
        tokens, labels, loss_mask, position_ids, packed_seq_params = packed_inputs(tokens, labels, loss_mask)
    else:
        tokens, labels, loss_mask, position_ids = this_cp_rank(tokens, labels, loss_mask, position_ids)
    timers("batch-generator").stop()
    output = model(tokens, position_ids, None, labels=labels, packed_seq_params=packed_seq_params)
    return output, partial(loss_func, loss_mask, unwrap_model(model), args.mdsa_phase)


def packed_inputs(tokens, labels, loss_mask, eod: int | None = None, cp_size: int | None = None,
                  cp_rank: int | None = None):
    """A micro-batch [B, S] as megatron-core's THD input: one row of documents
    (``data.packing``), this CP rank's share of it in megatron's packed CP layout (each
    document in 2 * CP chunks), and the ``PackedSeqParams`` with the global boundaries.
    Returns (tokens, labels, loss_mask, position_ids, packed_seq_params)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_dsa.data.packing import pack_batch

    if eod is None:
        eod = _corpus_eod()
    batch = pack_batch(tokens, labels, loss_mask, eod)
    cu = batch.cu_seqlens
    local = this_cp_rank(batch.tokens, batch.labels, batch.loss_mask, batch.position_ids, cu_seqlens=cu,
                         cp_size=cp_size, cp_rank=cp_rank)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen)
    return (*local, params)


def this_cp_rank(*tensors, cu_seqlens=None, cp_size: int | None = None, cp_rank: int | None = None):
    """This CP rank's share of full-sequence [B, S] tensors, in megatron's layout (what
    Megatron-LM's get_batch_on_this_cp_rank hands each rank: chunks r and 2CP-1-r of 2 * CP, of
    every document when packed), which the DSA layer's positions and key gathers assume."""
    from megatron.core import parallel_state

    from megatron_dsa.parallel.comm import cp_split

    if cp_size is None:
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
    return [cp_split(t, cp_size, cp_rank, dim=1, cu_seqlens=cu_seqlens) for t in tensors]


def _corpus_eod() -> int:
    """The corpus's end-of-document token (the one its documents end with)."""
    if "eod" not in _STATE:
        from megatron_dsa.data import load_tokenizer

        _STATE["eod"] = load_tokenizer(_args().mdsa_data_dir).eod
    return _STATE["eod"]


# --------------------------------------------------------------------------------------------
# Throughput, TFLOP/s (with the indexer term) and a progress line with ETA


class Progress:
    """Measures each training iteration from the first forward of the next one (Megatron's
    loop calls no hook of ours after the optimizer step); writes tokens/s and TFLOP/s to
    TensorBoard and prints ``[phase] it/total | tok/s | TFLOP/s | ETA``."""

    def __init__(self):
        self.last_iter = None
        self.last_time = None
        self.start_iter = None
        self.start_time = None
        self.flops_per_iter = None

    def tick(self, args) -> None:
        iteration = args.curr_iteration
        now = time.perf_counter()
        if iteration == self.last_iter:
            return  # a later microbatch of the same iteration
        if self.flops_per_iter is None:
            from megatron_dsa.flops import training_flops_per_iteration

            self.flops_per_iter = training_flops_per_iteration(
                _STATE["model_config"], args.seq_length, args.global_batch_size,
                args.padded_vocab_size, args.mdsa_phase,
            )
            self.start_iter, self.start_time = iteration, now
        if self.last_iter is not None and iteration == self.last_iter + 1:
            self._report(args, iteration, now - self.last_time)
        self.last_iter, self.last_time = iteration, now

    def _report(self, args, done: int, seconds: float) -> None:
        from megatron.training import get_tensorboard_writer
        from megatron.training.utils import is_last_rank

        tokens = args.global_batch_size * args.seq_length
        tok_s = tokens / max(seconds, 1e-9)
        tflops = self.flops_per_iter / max(seconds, 1e-9) / 1e12 / args.world_size
        writer = get_tensorboard_writer()
        if writer is not None:
            writer.add_scalar("tokens-per-sec", tok_s, done)
            writer.add_scalar("tflops-per-device (with indexer)", tflops, done)
        if not is_last_rank():
            return
        if args.mdsa_metrics_file:
            with open(args.mdsa_metrics_file, "a") as f:
                f.write(json.dumps({"iteration": done, "seconds": seconds, "tokens_per_s": tok_s,
                                    "tflops_per_device": tflops, "peak_memory_gb": _peak_memory_gb()}) + "\n")
        if args.mdsa_progress and (done % args.log_interval == 0 or done == args.train_iters - 1):
            rate = (done - self.start_iter) / max(time.perf_counter() - self.start_time, 1e-9)
            left = (args.train_iters - done) / max(rate, 1e-9)
            pct = 100.0 * done / args.train_iters
            bar = "#" * int(pct / 5) + "." * (20 - int(pct / 5))
            print(f" [{args.mdsa_phase}] [{bar}] {done}/{args.train_iters} ({pct:.0f}%) | "
                  f"{tok_s:,.0f} tokens/s | {tflops:.4f} TFLOP/s/device (indexer counted) | "
                  f"ETA {_hms(left)}", flush=True)


def _peak_memory_gb() -> float:
    """This process's peak: CUDA memory allocated on a GPU, the resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


_PROGRESS = Progress()


# --------------------------------------------------------------------------------------------
# Run


def _single_process_store():
    """Outside torchrun: a world of one, whose rendezvous store holds its local port from now
    until the process group is made (Megatron binds env:// ports only tens of seconds later,
    and a concurrent job could take a port picked earlier). None under torchrun."""
    if "WORLD_SIZE" in os.environ:
        return None
    from megatron_dsa.distributed import local_store

    store = local_store()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    return store


class TrainRunError(RuntimeError):
    """A run that stopped on a known failure (non-finite values, an unreadable checkpoint);
    the message is one line."""


def _grad_failure(error: RuntimeError) -> str | None:
    """Megatron's gradient check (rerun machine disabled) raises RuntimeError("Rank r, ...,
    iteration N: Unexpected result nan (message='found NaN in local grad norm ...')"). Name the
    iteration (ours: its N is one ahead of the iteration it logs) and the first parameter whose
    gradient is non-finite."""
    import re

    found = re.search(r"Unexpected result \S+ \(message='found (NaN|Inf) in local grad norm", str(error))
    if found is None:
        return None
    first = None
    model = _STATE.get("model")
    if model is not None:
        for name, param in model.named_parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                first = name
                break
    where = f"; first parameter with a non-finite gradient: {first}" if first else ""
    return f"{_where(True)}: a gradient is non-finite ({found.group(1)} in the gradient norm{where})"


def _stop_message(error: BaseException, plan: dict) -> str | None:
    """The one-line account of a known failure, with where the run can resume from."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_dsa import safe_load
    from megatron_dsa.train.preflight import TRACKER_FILE

    if isinstance(error, NonFiniteError):
        what = str(error)
    elif isinstance(error, RuntimeError) and _grad_failure(error):
        what = _grad_failure(error)
    elif isinstance(error, (CheckpointException, safe_load.CheckpointError)):
        return f"cannot load the checkpoint: {safe_load.describe(error)}"
    else:
        return None
    tracker = os.path.join(plan["save"], TRACKER_FILE)
    last = open(tracker).read().strip() if os.path.isfile(tracker) else None
    kept = (f"nothing of it was saved; the last good checkpoint is iteration {last} in {plan['save']}"
            if last else "nothing of it was saved (no checkpoint yet)")
    step = what.split(":", 1)[0]
    skip = f"; to step over its batch on resume: train.skip_iterations=[{step.split()[-1]}]" if step.startswith("iteration") else ""
    return f"{what}; {kept}{skip}"


def run(cfg: RunConfig, plan: dict, skip_patches: frozenset[str] = frozenset()) -> None:
    """Run one phase in this process (torchrun gives each process its rank).

    ``skip_patches`` leaves named training patches out (tests show each one is needed).
    Known failures (non-finite values, unreadable checkpoints) raise TrainRunError."""
    import patches
    from patches.training import TRAINING_CPU_PATCHES, WHEEL_PATCHES, apply_training_cpu_patches

    patches.apply_cpu_patches()
    apply_training_cpu_patches(only={p.name for p in WHEEL_PATCHES + TRAINING_CPU_PATCHES} - set(skip_patches))

    import megatron.training.training as megatron_training
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_dsa import safe_load
    from megatron_dsa.train.preflight import has_checkpoint, remove_run_file, write_run_file

    # Resume and load_from read checkpoints through the allow-list (no code runs from them).
    safe_load.install()
    store = _single_process_store()
    sys.argv = [sys.argv[0], *megatron_argv(cfg, plan)]
    args = parse_and_validate_args(extra_args_provider=add_mdsa_args)
    # Only once Megatron has accepted its flags: a run refused there leaves nothing behind.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    created = write_run_file(plan) if rank0 else None
    _wrap_once(megatron_training, "training_log", _log_every_stage)
    _wrap_once(megatron_training, "evaluate", _drop_validation_metrics)
    try:
        container = pretrain_cfg_container_from_args(args, None)
        pretrain(
            container,
            train_valid_test_datasets_provider,
            ModelType.encoder_or_decoder,
            forward_step,
            model_provider=model_provider,
            store=store,
        )
    except BaseException as error:
        if rank0 and not has_checkpoint(plan["save"]):
            # Nothing to resume: the record (and the directory this run made) would only make
            # the next run with other settings refuse the directory.
            remove_run_file(plan, created)
        message = _stop_message(error, plan)
        if message is not None:
            raise TrainRunError(message) from None
        raise
