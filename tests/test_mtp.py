"""Multi-token prediction (megatron-core's MTP block) whose layer is our DSA layer, on CPU.

The conversion side (the releases' MTP layer, DeepSeek-V3's MTP formula from the HF tensors)
is in test_convert_release.py; the trainer's run with the MTP loss in test_train.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_dsa.layer import INDEXER_KL, pop_indexer_losses
from megatron_dsa.model import build_model, dsa_layers, indexer_parameters, model_config
from tests.helpers import set_indexer_loss_scale

TOPK = 8  # below the sequence length: sparse attention selects


def make(seed: int, **overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed % 10000)
    return build_model("tiny", model_config("tiny", dsa_indexer_topk=TOPK, **overrides))


def pair(seed: int, **overrides):
    """The tiny model with one MTP layer, and without it holding the same weights."""
    with_mtp = make(seed, mtp_num_layers=1, **overrides)
    without = make(seed, **overrides)
    missing, unexpected = with_mtp.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mtp.") for k in missing)
    return with_mtp, without


def batch(seed: int, b: int = 1, s: int = 20):
    tokens = torch.randint(0, 512, (b, s), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(s)[None].expand(b, -1), tokens.roll(-1, dims=1)


def mtp_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith("mtp.")}


def set_mtp_loss_scale(value: float) -> None:
    """megatron-core's schedule sets the MTP loss's backward scale per microbatch."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    MTPLossAutoScaler.set_loss_scale(torch.tensor(float(value)))


def test_the_mtp_layer_is_a_dsa_layer_numbered_after_the_decoder(megatron_world, seed):
    model = make(seed, mtp_num_layers=1, mdsa_mode="sparse", dsa_indexer_topk_freq=3)
    cores = dsa_layers(model)
    assert [c.layer_number for c in cores] == [1, 2, 3, 4]
    assert [c.is_mtp_layer for c in cores] == [False, False, False, True]
    # Layers 2 and 3 reuse layer 1's top-k; the MTP layer, on hidden states of its own, selects.
    assert [c.selects for c in cores] == [True, False, False, True] and cores[3].indexer is not None
    assert cores[1].__dict__["_selection_source"] is cores[0] and cores[2].__dict__["_selection_source"] is cores[0]
    assert model.mtp.layers[0].mtp_model_layer.self_attention.core_attention is cores[3]
    assert {id(p) for p in cores[3].indexer.parameters()} <= {id(p) for p in indexer_parameters(model)}
    # The layer after first_k_dense decoder layers is MoE, as the releases' layer 61.
    assert type(model.mtp.layers[0].mtp_model_layer.mlp).__name__ == "MoELayer"


def test_megatron_lm_layer_specs_refuse_dsa():
    """Why the MTP block is built from our spec: megatron-core's GPT decoder specs, from which
    Megatron-LM's builder derives its MTP layer, refuse the DSA attention variant."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

    with pytest.raises(AssertionError, match="Experimental attention variant is not supported"):
        get_gpt_decoder_layer_specs(model_config("tiny", mtp_num_layers=1), use_transformer_engine=False)


def test_mtp_loss_trains_the_mtp_layer_and_leaves_the_lm_loss_alone(megatron_world, seed):
    """Sparse mode: the LM loss is the model's without MTP, bit for bit; the MTP loss (its value
    the cross-entropy of the MTP depth's logits against the token after next) reaches every
    MTP parameter, the MTP layer's indexer (its sparse KL) and the decoder below."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    with_mtp, without = pair(seed, mdsa_mode="sparse")
    tokens, positions, labels = batch(seed)
    set_indexer_loss_scale(1.0)
    set_mtp_loss_scale(1.0)
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    seen = []
    hook = with_mtp.mtp.register_forward_hook(lambda module, args, out: seen.append(out))
    loss = with_mtp(tokens, positions, None, labels=labels)
    hook.remove()
    plain = without(tokens, positions, None, labels=labels)
    assert torch.isfinite(loss).all() and torch.equal(loss, plain)

    # The tracked MTP loss: the MTP depth's logits at position i against labels[i + 1] (the
    # token two ahead), the last position (no such label) masked.
    logits, _ = with_mtp.output_layer(seen[0].chunk(2, dim=0)[1])
    logits = logits.transpose(0, 1).float()[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    tracked = MTPLossLoggingHelper.tracker["loss_values"][0]
    assert torch.isfinite(tracked) and abs(tracked.item() - expected.item()) < 1e-5 * expected.item()

    loss.mean().backward()
    plain.mean().backward()
    grads = {n: p.grad for n, p in mtp_parameters(with_mtp).items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for part in ("enorm", "hnorm", "eh_proj", "final_layernorm", "self_attention.linear_q_down_proj",
                 "self_attention.linear_kv_up_proj", "core_attention.indexer.wq_b", "mlp.router",
                 "mlp.shared_experts.linear_fc1"):
        assert any(g.abs().sum() > 0 for n, g in grads.items() if part in n), part
    # The MTP loss flows into the decoder and the shared embedding and output layer.
    decoder = dict(without.named_parameters())
    for name in ("decoder.layers.2.self_attention.linear_proj.weight", "embedding.word_embeddings.weight",
                 "output_layer.weight"):
        ours, theirs = dict(with_mtp.named_parameters())[name].grad, decoder[name].grad
        assert (ours - theirs).abs().max() > 1e-6 * theirs.abs().max(), name


def test_mtp_loss_scaling_factor_scales_what_reaches_the_decoder(megatron_world, seed):
    """mtp_loss_scaling_factor = 0 (and no router balance loss, which the MTP layer's MoE adds
    on its own): the decoder's gradients are the model's without MTP."""
    with_mtp, without = pair(seed, mdsa_mode="dense", mtp_loss_scaling_factor=0.0, moe_aux_loss_coeff=0.0)
    tokens, positions, labels = batch(seed)
    set_mtp_loss_scale(1.0)
    with_mtp(tokens, positions, None, labels=labels).mean().backward()
    without(tokens, positions, None, labels=labels).mean().backward()
    theirs = dict(without.named_parameters())
    for name, p in with_mtp.named_parameters():
        if name in theirs and theirs[name].grad is not None:
            assert torch.allclose(p.grad, theirs[name].grad, rtol=1e-5, atol=1e-8), name


def test_warmup_trains_the_mtp_indexer_like_the_others(megatron_world, seed):
    """Warm-up: the trainer's freezing leaves every indexer trainable, the MTP layer's included,
    and nothing else; the MTP layer hands its KL to pop_indexer_losses and records it in its own
    slot of the metrics tracker (after the decoder's three)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_dsa.train.trainer import freeze_for_phase

    model = make(seed, mtp_num_layers=1, mdsa_mode="warmup")
    freeze_for_phase(model, "warmup")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if ".indexer." in n}
    assert any(n.startswith("mtp.") for n in trainable)
    get_moe_metrics_tracker().metrics.pop(INDEXER_KL, None)
    tokens, positions, labels = batch(seed)
    model(tokens, positions, None, labels=labels)
    losses = pop_indexer_losses(model)
    assert len(losses) == 4 and all(torch.isfinite(k) and k > 0 for k in losses)
    kl = get_moe_metrics_tracker().metrics[INDEXER_KL].values
    assert kl.shape == (4,) and (kl > 0).all()
    get_moe_metrics_tracker().metrics.pop(INDEXER_KL)
    sum(losses).backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp.") and ".indexer." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        elif not p.requires_grad:
            assert p.grad is None, name


def test_repeated_mtp_layer_is_refused():
    from megatron_dsa.config import DSAConfigError

    with pytest.raises(DSAConfigError, match="mtp_use_repeated_layer"):
        model_config("tiny", mtp_num_layers=2, mtp_use_repeated_layer=True)


def test_trainer_passes_the_mtp_settings_to_megatron(tmp_path):
    """The model's MTP settings (model.overrides or the size) are Megatron's MTP flags too (its
    loop scales and logs the MTP loss from its own args); setting those flags by hand is refused."""
    from megatron_dsa.train.config import TrainConfigError, load_config
    from megatron_dsa.train.flags import megatron_argv

    base = ["phase=pretrain", f"data.dir={tmp_path}", f"checkpoint.save={tmp_path / 'ckpt'}"]
    plan = {"transformer_impl": "local", "data_dir": str(tmp_path)}
    cfg = load_config(None, base + ["model.overrides.mtp_num_layers=1", "model.overrides.mtp_loss_scaling_factor=0.3"])
    argv = megatron_argv(cfg, plan)
    at = argv.index("--mtp-num-layers")
    assert argv[at: at + 4] == ["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3"]
    assert "--mtp-num-layers" not in megatron_argv(load_config(None, base), plan)
    with pytest.raises(TrainConfigError, match="set model.overrides.mtp_num_layers instead"):
        load_config(None, base + ["megatron.mtp_num_layers=1"])


def test_finite_watch_numbers_the_mtp_layer_after_the_decoder(megatron_world, seed):
    """The trainer's non-finite report names layers by the per-layer metrics' numbers: the MTP
    layer's output is watched as layer num_layers + 1, not as megatron-core's MTP-local 1."""
    from megatron_dsa.train import trainer

    model = make(seed, mtp_num_layers=1, mdsa_mode="dense")
    trainer.watch_finite_outputs(model)
    trainer._LAYER_FINITE.clear()
    tokens, positions, labels = batch(seed)
    with torch.no_grad():
        model(tokens, positions, None, labels=labels)
    assert sorted(n for n, _ in trainer._LAYER_FINITE) == [1, 2, 3, 4]
    trainer._LAYER_FINITE.clear()
