"""The README's main job: forward + backward of the tiny MoE in every DSA mode, with timings.

    bash launch/main.sh [--size tiny] [--seq 256] [--batch 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    from megatron_dsa.config import set_mode
    from megatron_dsa.distributed import init_single_process
    from megatron_dsa.layer import pop_indexer_losses
    from megatron_dsa.model import SIZES, build_model, count_parameters, model_config

    init_single_process()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[args.size]
    model = build_model(args.size, model_config(args.size)).to(device)
    print(f"model {args.size}: {count_parameters(model) / 1e6:.2f}M parameters on {device}, "
          f"batch {args.batch} x seq {args.seq}, top-k {model.config.dsa.topk}")
    tokens = torch.randint(0, size.vocab_size, (args.batch, args.seq), device=device)
    positions = torch.arange(args.seq, device=device)[None].expand(args.batch, -1)
    rows = []
    for mode in ("dense", "warmup", "sparse"):
        set_mode(model.config, mode)
        times = []
        for _ in range(args.steps + 1):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(tokens, positions, None, labels=tokens.roll(-1, 1)).float().mean()
            kl = pop_indexer_losses(model)
            (sum(kl) if mode == "warmup" else loss).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = sorted(times[1:])[len(times[1:]) // 2]  # first step warms up
        kl_value = sum(k.item() for k in kl) / len(kl) if kl else float("nan")
        rows.append((mode, loss.item(), kl_value, median * 1e3))
    print(f"{'mode':<8} {'lm loss':>9} {'indexer KL':>11} {'fwd+bwd ms':>11}")
    for mode, loss, kl, ms in rows:
        print(f"{mode:<8} {loss:>9.4f} {kl:>11.4f} {ms:>11.1f}")


if __name__ == "__main__":
    main()
