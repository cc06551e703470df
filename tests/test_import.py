"""Continued training from a Hugging Face model: ``from-hf`` in one command, then a sparse run
from its checkpoint at another parallel layout.

A DeepSeek-V3.2 model of the tiny size's shape (its top-k 8, not tiny's 16), written by
transformers, is imported by ``python -m megatron_dsa.convert from-hf``. The run-config
settings it prints start a sparse run under ``launch/torchrun.sh`` at TP=2 (sequence parallel)
and at EP=2, two CPU processes each: the first step's LM loss is the loss that one process
computes with the imported weights on the same batch (and the transformers model's), so the
weights were loaded, resharded, and not initialised afresh; the run starts at iteration 1 with
a fresh optimizer. A run config that describes another model, a phase that starts from
scratch, or another tokenizer stops in preflight with one line naming what differs.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_dsa.convert.cli import main as convert_main
from megatron_dsa.convert.cli import training_settings
from megatron_dsa.model import SIZES
from test_convert import randomize_hf_
from test_launch import CONFIGS, REPO, _env, base, cli, expect_error  # noqa: F401 (cli: fixture)

SEQ = 32
TOPK = 8
SEED = 1234


def tiny_shaped_hf(path: Path):
    """A transformers DeepseekV32ForCausalLM with the tiny size's shape and top-k ``TOPK``."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    size = SIZES["tiny"]
    t = size.transformer
    torch.manual_seed(11)
    cfg = DeepseekV32Config(
        vocab_size=size.vocab_size, max_position_embeddings=size.max_seq_len, num_hidden_layers=t["num_layers"],
        first_k_dense_replace=size.first_k_dense, hidden_size=t["hidden_size"], intermediate_size=t["ffn_hidden_size"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_attention_heads"],
        q_lora_rank=t["q_lora_rank"], kv_lora_rank=t["kv_lora_rank"], qk_nope_head_dim=t["qk_head_dim"],
        qk_rope_head_dim=t["qk_pos_emb_head_dim"], v_head_dim=t["v_head_dim"], n_routed_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"], moe_intermediate_size=t["moe_ffn_hidden_size"], n_shared_experts=1,
        n_group=t["moe_router_num_groups"], topk_group=t["moe_router_group_topk"],
        routed_scaling_factor=t["moe_router_topk_scaling_factor"], index_n_heads=t["dsa_indexer_n_heads"],
        index_head_dim=t["dsa_indexer_head_dim"], index_topk=TOPK, rope_theta=float(t["rotary_base"]),
        rms_norm_eps=t["layernorm_epsilon"], initializer_range=0.1,
    )
    model = DeepseekV32ForCausalLM(cfg).eval()
    randomize_hf_(model)
    model.save_pretrained(str(path), max_shard_size="200KB")
    return model


@pytest.fixture(scope="module")
def imported(megatron_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    hf = tiny_shaped_hf(root / "hf")
    assert convert_main(["from-hf", "--hf", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    return dict(root=root, hf=hf, ckpt=root / "ckpt")


def run_settings(ckpt: Path) -> list[str]:
    """The run-config overrides from-hf prints for its checkpoint."""
    line = training_settings(ckpt)
    return shlex.split(line.split(" with: ", 1)[1])


def test_from_hf_prints_the_settings_of_the_imported_model(imported):
    assert run_settings(imported["ckpt"]) == [f"checkpoint.load_from={imported['ckpt']}", "model.size=tiny",
                                              f"model.overrides.dsa_indexer_topk={TOPK}"]


def first_batch(corpus: Path, iters: int, global_batch: int) -> dict[str, torch.Tensor]:
    """The first global batch Megatron's loop trains on (its GPTDataset, in sampler order)."""
    from megatron_dsa.data import build_gpt_datasets

    train, _ = build_gpt_datasets(corpus, SEQ, random_seed=SEED, train_samples=iters * global_batch, valid_samples=0)
    samples = [train[i] for i in range(global_batch)]
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("tokens", "labels", "loss_mask", "position_ids")}


def single_rank_losses(imported, batch) -> tuple[float, float]:
    """Per-token LM loss of the batch: the imported checkpoint on one process (sparse), and the
    transformers model it came from."""
    from megatron_dsa.convert import load_model

    model, _ = load_model(imported["ckpt"], mdsa_mode="sparse")
    mask = batch["loss_mask"].float()
    with torch.no_grad():
        ours = model.eval()(batch["tokens"].long(), batch["position_ids"].long(), None, labels=batch["labels"].long())
        logits = imported["hf"](batch["tokens"].long()).logits.float()
    theirs = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"].long(), reduction="none")
    return (float((ours.float() * mask).sum() / mask.sum()), float((theirs * mask).sum() / mask.sum()))


LAYOUTS = {
    "tp2": (["megatron.tensor-model-parallel-size=2", "megatron.sequence-parallel=true"], 2),
    "ep2": (["megatron.expert-model-parallel-size=2"], 1),  # two data-parallel ranks, one sample each
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sparse_run_starts_from_the_imported_weights(imported, corpus, tmp_path, layout):
    flags, micro_batch = LAYOUTS[layout]
    iters, global_batch = 1, 2
    run = [*base(corpus, tmp_path, "sparse"), f"data.seq_length={SEQ}", f"train.seed={SEED}", f"train.iters={iters}",
           f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={global_batch}", "eval.iters=0",
           "logging.interval=1", *run_settings(imported["ckpt"]), *flags]
    result = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), *run], cwd=tmp_path,
                            env=dict(_env(), NPROC_PER_NODE="2"),
                            capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # Megatron's finetune load: weights only, a fresh optimizer, iteration 0 -> the run's 1.
    assert f"attempting to finetune with checkpoint in {imported['ckpt']}" in output
    assert (tmp_path / "save" / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    from megatron_dsa.train.runner import read_scalars

    logged = read_scalars(tmp_path / "tb")["lm loss"]
    assert [step for step, _ in logged] == [1], logged
    ours, theirs = single_rank_losses(imported, first_batch(corpus, iters, global_batch))
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (ours, theirs)
    assert abs(logged[0][1] - ours) <= 2e-5 * abs(ours), (layout, logged, ours)


def test_warmup_starts_from_the_imported_checkpoint(cli, corpus, tmp_path, imported):
    # the DSA kernels are the run's own choice, not the model's
    code, out, err = cli(*base(corpus, tmp_path, "warmup"), *run_settings(imported["ckpt"]),
                         "model.overrides.mdsa_kernel=reference", "--check")
    assert code == 0, err
    assert f"starting from weights of {imported['ckpt']}" in out


@pytest.mark.parametrize("changes, needles", [
    # the run's own top-k (tiny's 16) is not the model's
    ([], ["dsa_indexer_topk: checkpoint 8, run 16", "model.overrides.dsa_indexer_topk=8"]),
    # a shape the checkpoint's tensors do not have
    ([f"model.overrides.dsa_indexer_topk={TOPK}", "model.overrides.moe_ffn_hidden_size=64"],
     ["moe_ffn_hidden_size: checkpoint 32, run 64"]),
    # a setting the import left at its default that changes what the weights compute
    ([f"model.overrides.dsa_indexer_topk={TOPK}", "model.overrides.mdsa_indexer_rope_dim=8"],
     ["mdsa_indexer_rope_dim: checkpoint None, run 8", "model.overrides.mdsa_indexer_rope_dim=null"]),
])
def test_a_run_of_another_model_stops_in_preflight(cli, corpus, tmp_path, imported, changes, needles):
    args = [*base(corpus, tmp_path, "sparse"), f"checkpoint.load_from={imported['ckpt']}", *changes]
    expect_error(cli(*args), "imported from Hugging Face", *needles)
    assert not (tmp_path / "save").exists()


def test_pretrain_and_another_tokenizer_are_refused(cli, corpus, tmp_path, imported):
    settings = run_settings(imported["ckpt"])
    expect_error(cli(*base(corpus, tmp_path, "pretrain"), *settings), "'pretrain' starts from scratch")
    other = tmp_path / "ckpt"
    shutil.copytree(imported["ckpt"], other)
    (other / "tokenizer.model").write_bytes(b"another tokenizer")
    expect_error(cli(*base(corpus, tmp_path, "sparse"), *settings, f"checkpoint.load_from={other}"),
                 "came with the tokenizer", "tokenize the corpus with the model's tokenizer")
    assert not (tmp_path / "save").exists()
