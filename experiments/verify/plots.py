"""The report's plots, from a run's results (``collect.collect``): one PNG per topic.

loss curves (pretraining, then each arm), retrieval and loss against context length, the
warm-up's indexer loss and recall, the step cost of each arm, and recall after warm-up against
k/L with the oracle.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from experiments.verify.settings import ARMS, TARGETS  # noqa: E402


def plots(res: dict, rdir: Path) -> dict[str, str]:
    """Write the PNGs into ``rdir``; returns {topic: file name}."""
    files = {}

    def save(name: str, fig) -> None:
        files[name] = f"verification_{name}.png"
        fig.tight_layout()
        fig.savefig(rdir / files[name], dpi=100)
        plt.close(fig)

    # 1. loss curves
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    pre = res["phases"].get("pretrain", {}).get("lm_loss", [])
    if pre:
        ax[0].plot([i for i, _ in pre], [v for _, v in pre], label="pretrain (dense)")
    off = max((i for i, _ in pre), default=0)
    for name, label in (("dense_control", "B: dense control"),
                        *((f"sparse_{a}", ARMS[a][0]) for a in res["arms"])):
        s = res["phases"].get(name, {}).get("lm_loss", [])
        if s:
            ax[1].plot([i for i, _ in s], [v for _, v in s], label=label)
            ax[0].plot([off + i for i, _ in s], [v for _, v in s], label=label, alpha=0.7)
    ax[0].set(title="training LM loss (pretrain, then each arm)", xlabel="iteration", ylabel="loss")
    ax[1].set(title="arms after pretraining (same data order)", xlabel="iteration in arm", ylabel="loss")
    for a in ax:
        a.legend(fontsize=7)
    save("loss", fig)
    # 2. retrieval vs length + loss vs length
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm, r in res["eval"].items():
        bl = r["retrieval"]["by_length"]
        xs = sorted(int(k) for k in bl)
        line, = ax[0].plot(xs, [bl[str(x)]["exact"] if str(x) in bl else bl[x]["exact"] for x in xs], "o-", label=arm)
        if "retrieval_train_formats" in r:  # the same arm's colour, dashed: the training formats
            bt = r["retrieval_train_formats"]["by_length"]
            xt = sorted(int(k) for k in bt)
            ax[0].plot(xt, [bt[str(x)]["exact"] if str(x) in bt else bt[x]["exact"] for x in xt], "x--",
                       color=line.get_color(), alpha=0.6)
        ls = sorted(int(k) for k in r["loss"])
        ax[1].plot(ls, [r["loss"][str(x)] if str(x) in r["loss"] else r["loss"][x] for x in ls], "o-", label=arm)
    ax[0].set(title="retrieval exact match, all tasks\n(solid: held-out formats, dashed: training formats)",
              xlabel="context length (tokens)", ylabel="%", xscale="log")
    ax[1].set(title="validation loss vs context length", xlabel="context length (tokens)", ylabel="loss", xscale="log")
    for a in ax:
        a.legend(fontsize=7)
    save("retrieval", fig)
    # 3. warm-up KL and recall
    save("warmup", _kl_and_recall(res["warmup"], "indexer loss during warm-up (each arm's own objective)",
                                  "top-k recall of the dense attention mass (warm-up)", "iteration"))
    # 4. speed: the side-by-side step benchmark when it ran, else the trainer's throughput
    fig, ax = plt.subplots(figsize=(9, 4))
    rows = [r for r in (res.get("speed") or {}).get("rows", []) if "ms" in r]
    if rows:
        ax.barh([r["arm"] for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set(title="training step (fwd+bwd), one process, side by side: tokens/s", xlabel="tokens/s")
    else:
        names = [n for n, p in res["phases"].items() if p["tokens_per_s"]]
        ax.barh(names, [res["phases"][n]["tokens_per_s"] for n in names])
        ax.set(title="training throughput (median tokens/s)", xlabel="tokens/s")
    save("speed", fig)
    # 5. recall after warm-up vs k/L at each length
    if res["recall"]:
        lengths = sorted({int(L) for r in res["recall"].values() for L in r})
        fig, ax = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
        for j, L in enumerate(lengths):
            for task, r in res["recall"].items():
                by_k = r.get(str(L), {})
                ks = sorted(by_k, key=int)
                vals = [by_k[k]["mean_nontrivial"] if by_k[k]["mean_nontrivial"] is not None else by_k[k]["mean"]
                        for k in ks]
                label = "untrained indexer" if task == "pretrain" else task
                ax[0][j].plot([by_k[k]["k_over_L"] for k in ks], vals, "o-", label=label)
                if task == "pretrain" and all(by_k[k].get("oracle_mean_nontrivial") is not None for k in ks):
                    x, oracle = [by_k[k]["k_over_L"] for k in ks], [by_k[k]["oracle_mean_nontrivial"] for k in ks]
                    ax[0][j].plot(x, oracle, "k--", label="oracle (attention's own top-k)")
                    ax[0][j].plot(x, [TARGETS["recall"] * o for o in oracle], ":", color="grey",
                                  label=f"target: {TARGETS['recall']:.0%} of the oracle")
            ax[0][j].set(title=f"top-k recall after warm-up, L = {L}", xlabel="k / L", xscale="log", ylim=(0, 1.02))
        ax[0][0].legend(fontsize=7)
        save("recall", fig)
    # 6. the report's recipe at 1 x 128K: KL and recall per step
    if res.get("recipe128k"):
        runs = {name.split("_", 1)[1]: r for name, r in res["recipe128k"].items()}
        save("128k", _kl_and_recall(runs, "indexer KL at 128K (sparse: over the selected keys)",
                                    "top-k recall of the dense attention mass at 128K, k = 2048", "step in phase"))
    return files


def _kl_and_recall(runs: dict, kl_title: str, recall_title: str, xlabel: str):
    """Two panels: each run's indexer loss (log scale) and top-k recall per step."""
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, r in runs.items():
        for a, key in ((ax[0], "kl"), (ax[1], "recall")):
            if r[key]:
                a.plot([i for i, _ in r[key]], [v for _, v in r[key]], label=label)
    ax[0].set(title=kl_title, xlabel=xlabel, yscale="log")
    ax[1].set(title=recall_title, xlabel=xlabel)
    for a in ax:
        a.legend(fontsize=7)
    return fig
