"""Configs, the launcher and bad input.

Every bad input (config, override, value, dataset, tokenizer, vocabulary, checkpoint
directories, Megatron flags) stops with ONE ``error: ...`` line and exit status 2 before any
compute, and writes nothing. torchrun with two processes (data parallel, gloo) trains and
checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"



@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Run the CLI in-process; the trainer must never be reached."""
    from megatron_dsa.train import cli as cli_module, trainer

    def no_compute(*args, **kwargs):
        raise AssertionError("bad input reached the trainer")

    monkeypatch.setattr(trainer, "run", no_compute)
    monkeypatch.delenv("RANK", raising=False)

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop output of the test's own set-up
        code = cli_module.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def base(corpus: Path, tmp_path: Path, phase: str = "pretrain") -> list[str]:
    return ["--config", str(CONFIGS / "tiny" / f"{phase}.yaml"), f"data.dir={corpus}",
            f"checkpoint.save={tmp_path / 'save'}", f"logging.tensorboard_dir={tmp_path / 'tb'}",
            "data.seq_length=32"]


def expect_error(result, *needles: str) -> str:
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("phase", ["pretrain", "warmup", "sparse"])
def test_shipped_configs_validate(size, phase):
    from megatron_dsa.train.config import load_config

    cfg = load_config(CONFIGS / size / f"{phase}.yaml")
    assert cfg.phase == phase and cfg.model["size"] == size
    lr = {"warmup": 1e-3, "sparse": 7.3e-6}.get(phase)
    if lr is not None:
        assert cfg.train["lr"] == lr  # the report's reference learning rates
    if phase != "pretrain":
        prev = {"warmup": "pretrain", "sparse": "warmup"}[phase]
        assert cfg.checkpoint["load_from"].endswith(f"{size}/{prev}/ckpt")


def test_overrides_nested_and_typed():
    from megatron_dsa.train.config import load_config

    cfg = load_config(CONFIGS / "tiny" / "sparse.yaml", [
        "train.iters=7", "train.lr=1e-3", "model.overrides.dsa_indexer_topk=8",
        "megatron.use_distributed_optimizer=true", "checkpoint.load_from=null",
    ])
    assert cfg.train["iters"] == 7 and cfg.train["lr"] == 1e-3
    assert cfg.model["overrides"] == {"dsa_indexer_topk": 8}
    assert cfg.megatron == {"use-distributed-optimizer": True}
    assert cfg.checkpoint["load_from"] is None


def test_megatron_argv_carries_mdsa_flags(corpus, tmp_path):
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight
    from megatron_dsa.train.flags import megatron_argv

    cfg = load_config(CONFIGS / "tiny" / "pretrain.yaml", base(corpus, tmp_path)[2:])
    argv = megatron_argv(cfg, preflight(cfg))
    assert argv[argv.index("--mdsa-phase") + 1] == "pretrain"
    assert argv[argv.index("--ckpt-format") + 1] == "torch_dist"
    from megatron.core.transformer.transformer_config import TransformerConfig
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    ours = [a[2:].replace("-", "_") for a in argv if a.startswith("--mdsa-")]
    assert ours and not set(ours) & fields  # never copied onto a config by Megatron
    assert not (tmp_path / "save").exists()  # preflight writes nothing


# --------------------------------------------------------------------------------------------
# Bad input: one message, no compute, nothing written


def test_missing_config(cli, tmp_path):
    expect_error(cli("--config", str(tmp_path / "nope.yaml")), "config file not found")


def test_invalid_yaml(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase: [pretrain\n")
    expect_error(cli("--config", str(bad)), "not valid YAML")


def test_unknown_top_level_key_lists_valid_keys(cli, tmp_path, corpus):
    cfg = yaml.safe_load((CONFIGS / "tiny" / "pretrain.yaml").read_text())
    cfg["optimiser"] = {"lr": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    expect_error(cli("--config", str(path)), "'optimiser'", "valid top-level keys", "'train'")


@pytest.mark.parametrize("override, needles", [
    ("train.itres=5", ("train.itres", "valid keys of 'train'", "iters")),
    ("train.iters=0", ("train.iters must be > 0",)),
    ("train.lr=fast", ("train.lr must be float/int", "fast")),
    ("train.lr_decay_style=zigzag", ("lr_decay_style",)),
    ("phase=finetune", ("phase must be one of",)),
    ("train.iters", ("expected key=value",)),
    ("model.size=huge", ("model.size must be one of",)),
    ("model.overrides.dsa_indexer_head_dim=33", ("dsa_indexer_head_dim must be even",)),
    ("model.overrides.dsa_indexer_topk=2.5", ("model.overrides.dsa_indexer_topk must be an integer, got 2.5",)),
    ("model.overrides.dsa_indexer_topk=true", ("model.overrides.dsa_indexer_topk must be an integer, got True",)),
    ("model.overrides.dsa_indexer_topk=16.9", ("model.overrides.dsa_indexer_topk must be an integer, got 16.9",)),
    ("model.overrides.dsa_indexer_topk=abc", ("model.overrides.dsa_indexer_topk must be an integer, got 'abc'",)),
    # Parallel layout and precision have one source, Megatron's flags.
    ("model.overrides.tensor_model_parallel_size=2", ("model.overrides.tensor_model_parallel_size",
                                                      "set megatron.tensor_model_parallel_size instead")),
    ("model.overrides.context_parallel_size=2", ("set megatron.context_parallel_size instead",)),
    ("model.overrides.sequence_parallel=true", ("set megatron.sequence_parallel instead",)),
    # Megatron's own argument validation runs in preflight.
    ("megatron.tensor_model_parallel_size=2", ("Megatron rejects these settings", "world size (1)")),
    ("model.overrides.no_such_field=1", ("unknown transformer config fields",)),
    ("data.seq_length=4096", ("exceeds",)),
    ("megatron.no_such_flag=1", ("bad Megatron flag", "no-such-flag")),
    ("megatron.num_layers=abc", ("bad Megatron flag",)),
])
def test_bad_values(cli, corpus, tmp_path, override, needles):
    expect_error(cli(*base(corpus, tmp_path), override), *needles)
    assert not (tmp_path / "save").exists() and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("world, override, needles", [
    (3, "megatron.tensor_model_parallel_size=3", ("num_attention_heads (4) must be divisible by the tensor parallel size (3)",)),
    (2, "megatron.context_parallel_size=2", None),  # valid: ok
    (2, "megatron.tensor_model_parallel_size=2", None),
])
def test_parallel_settings_checked_for_the_world_size(cli, corpus, tmp_path, monkeypatch, world, override, needles):
    """Parallel sizes against the launch's world size and the model's heads and experts, as
    Megatron and the trainer will build them, in preflight (torchrun.sh passes WORLD_SIZE)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    result = cli(*base(corpus, tmp_path), *override.split(), "--check")
    if needles is None:
        assert result[0] == 0 and result[1].startswith("ok: "), result
    else:
        expect_error(result, *needles)
    assert not (tmp_path / "save").exists()


def test_missing_dataset(cli, tmp_path):
    expect_error(cli(*base(tmp_path / "no-corpus", tmp_path)), "does not exist")


def test_missing_tokenizer(cli, corpus, tmp_path):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    (broken / "tokenizer.model").unlink()
    expect_error(cli(*base(broken, tmp_path)), "tokenizer file not found")


def test_truncated_dataset(cli, corpus, tmp_path):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    bin_path = broken / "train_text_document.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    expect_error(cli(*base(broken, tmp_path)), "truncated")


def test_vocab_mismatch(cli, tmp_path):
    from megatron_dsa.data import build_corpus

    other = tmp_path / "other"
    build_corpus(other, None, 600, max_bytes=120_000, valid_fraction=0.1)
    expect_error(cli(*base(other, tmp_path)), "vocab", "does not match")


def _fake_checkpoint(directory: Path, record: dict) -> Path:
    """A run directory whose checkpoint is a real (tiny) torch_dist one: .metadata + shard."""
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt = directory / "iter_0000010"
    ckpt.mkdir(parents=True)
    dcp.save({"w": torch.arange(64.0), "note": "x"}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "metadata.json").write_text("{}")
    (directory / "latest_checkpointed_iteration.txt").write_text("10")
    (directory / "mdsa_run.json").write_text(json.dumps(record))
    return ckpt


class _Payload:
    """Unpickling this creates ``path`` (what a crafted checkpoint could do instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _corrupt(ckpt: Path, how: str, payload: Path) -> None:
    import pickle

    meta = ckpt / ".metadata"
    shard = next(ckpt.glob("*.distcp"))
    if how == "truncated .metadata":
        meta.write_bytes(meta.read_bytes()[:40])
    elif how == "truncated .distcp":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif how == "missing .distcp":
        shard.unlink()
    elif how == "crafted .metadata":
        meta.write_bytes(pickle.dumps({"state": _Payload(payload)}))


_CORRUPT = [
    ("truncated .metadata", ("is corrupt", ".metadata")),
    ("truncated .distcp", ("is truncated", ".distcp")),
    ("missing .distcp", ("is missing", ".distcp")),
    ("crafted .metadata", ("refusing to open checkpoint", "names _io.open")),
]


@pytest.mark.parametrize("how, needles", _CORRUPT)
def test_resume_from_a_corrupt_checkpoint(cli, corpus, tmp_path, how, needles):
    """A corrupt or crafted checkpoint in checkpoint.save stops preflight with one line naming
    the file; a crafted .metadata's payload does not run."""
    ckpt = _fake_checkpoint(tmp_path / "save", _record(corpus, tmp_path, "pretrain"))
    _corrupt(ckpt, how, tmp_path / "payload-ran")
    expect_error(cli(*base(corpus, tmp_path), "--check"), *needles)
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.parametrize("how, needles", _CORRUPT[::3])
def test_load_from_a_corrupt_checkpoint(cli, corpus, tmp_path, how, needles):
    ckpt = _fake_checkpoint(tmp_path / "pre", _record(corpus, tmp_path, "pretrain"))
    _corrupt(ckpt, how, tmp_path / "payload-ran")
    expect_error(cli(*base(corpus, tmp_path, "warmup"), f"checkpoint.load_from={tmp_path / 'pre'}", "--check"),
                 *needles)
    assert not (tmp_path / "payload-ran").exists() and not (tmp_path / "save").exists()


def _record(corpus: Path, tmp_path: Path, phase: str) -> dict:
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight

    cfg = load_config(CONFIGS / "tiny" / f"{phase}.yaml",
                      base(corpus, tmp_path / "probe")[2:] + ["checkpoint.load_from=null"])
    return json.loads(json.dumps(preflight(cfg, check_flags=False)["record"], default=str))


def test_save_dir_of_another_phase(cli, corpus, tmp_path):
    save = tmp_path / "save"
    _fake_checkpoint(save, _record(corpus, tmp_path, "pretrain"))
    before = sorted(p.name for p in save.iterdir())
    expect_error(cli(*base(corpus, tmp_path, "warmup"), "checkpoint.load_from=null"),
                 "holds a 'pretrain' run", "'warmup'")
    assert sorted(p.name for p in save.iterdir()) == before


def test_save_dir_of_another_shape(cli, corpus, tmp_path):
    record = _record(corpus, tmp_path, "pretrain")
    record["shape"]["hidden_size"] = 128
    _fake_checkpoint(tmp_path / "save", record)
    expect_error(cli(*base(corpus, tmp_path)), "another shape", "hidden_size")


def test_save_dir_not_ours(cli, corpus, tmp_path):
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "notes.txt").write_text("mine")
    expect_error(cli(*base(corpus, tmp_path)), "not empty")


def test_load_from_of_another_shape(cli, corpus, tmp_path):
    record = _record(corpus, tmp_path, "pretrain")
    record["shape"]["num_layers"] = 4
    _fake_checkpoint(tmp_path / "prev", record)
    expect_error(cli(*base(corpus, tmp_path, "warmup"), f"checkpoint.load_from={tmp_path / 'prev'}"),
                 "another shape", "num_layers")
    assert not (tmp_path / "save").exists()


def test_load_from_of_wrong_phase(cli, corpus, tmp_path):
    _fake_checkpoint(tmp_path / "prev", _record(corpus, tmp_path, "pretrain"))
    expect_error(cli(*base(corpus, tmp_path, "sparse"), f"checkpoint.load_from={tmp_path / 'prev'}"),
                 "starts from a 'warmup' checkpoint")


def test_load_from_other_tokenizer(cli, corpus, tmp_path):
    record = _record(corpus, tmp_path, "pretrain")
    record["tokenizer_sha256"] = "0" * 64
    _fake_checkpoint(tmp_path / "prev", record)
    expect_error(cli(*base(corpus, tmp_path, "warmup"), f"checkpoint.load_from={tmp_path / 'prev'}"),
                 "tokenizer")


def test_load_from_without_checkpoint(cli, corpus, tmp_path):
    (tmp_path / "prev").mkdir()
    expect_error(cli(*base(corpus, tmp_path, "warmup"), f"checkpoint.load_from={tmp_path / 'prev'}"),
                 "holds no checkpoint")


def test_load_from_with_missing_iteration(cli, corpus, tmp_path):
    _fake_checkpoint(tmp_path / "prev", _record(corpus, tmp_path, "pretrain"))
    shutil.rmtree(tmp_path / "prev" / "iter_0000010")
    expect_error(cli(*base(corpus, tmp_path, "warmup"), f"checkpoint.load_from={tmp_path / 'prev'}"),
                 "missing or incomplete")


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable)
    # No rendezvous inherited either: a one-node launch lets torchrun bind a free port itself.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(key, None)
    return env


def test_real_process_prints_one_line(corpus, tmp_path):
    """The same in a fresh process (library warnings included): exactly one stderr line."""
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *base(corpus, tmp_path), "train.iters=-1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: train.iters must be > 0, got -1"], result.stderr
    assert not (tmp_path / "save").exists()


def test_torchrun_sh_rejects_bad_input_once(corpus, tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), *base(corpus, tmp_path), "train.bogus=1"],
        cwd=tmp_path, env=dict(_env(), NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown key(s) ['train.bogus']"), result.stderr


# --------------------------------------------------------------------------------------------
# torchrun, two processes


def _free_port() -> int:
    """A port for launches that must agree on one in advance (several nodes), free now and below
    the kernel's ephemeral range: every other rendezvous of the suite binds port 0 and gets an
    ephemeral port, so none of them can take this one before the launch binds it. (One-node
    launches leave MASTER_PORT unset: torchrun binds a free port itself.)"""
    import random

    low = max(int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]), 10200)
    for port in random.sample(range(10000, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 10000-{low - 1}")


@pytest.fixture(scope="module")
def data_parallel_run(corpus, tmp_path_factory) -> tuple[str, Path]:
    """torchrun with two processes (data parallel): 4 iterations of the tiny pretraining, a
    checkpoint at 4. (Its output, its directory.) Its tests share one xdist worker: GROUPS in
    tests/conftest.py."""
    root = tmp_path_factory.mktemp("dp2")
    env = dict(_env(), NPROC_PER_NODE="2")
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), *base(corpus, root), "train.iters=4", "train.lr_warmup_iters=0",
         "train.micro_batch_size=2", "train.global_batch_size=4", "eval.interval=4", "eval.iters=1",
         "checkpoint.interval=4", "logging.interval=1"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output, root


def test_torchrun_two_processes_data_parallel(data_parallel_run):
    output, root = data_parallel_run
    assert "data-parallel size: 2" in output
    assert (root / "save" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (root / "save" / "mdsa_run.json").is_file()
    from megatron_dsa.train.runner import read_scalars

    loss = read_scalars(root / "tb")["lm loss"]
    assert [i for i, _ in loss] == [1, 2, 3, 4] and all(0 < v < 10 for _, v in loss)


def test_context_parallel_warmup_equals_one_process(corpus, tmp_path, data_parallel_run):
    """The warm-up at CP=2 (two processes, each given its share of every sequence in megatron's
    chunk layout: dense attention and the dense KL over keys of both ranks) logs the LM loss and
    the indexer loss of one process, at the first step and after an optimizer step on the CP
    gradients. Both start from one checkpoint (Megatron's initialisation depends on the layout):
    the data-parallel run's pretraining."""
    from megatron_dsa.train.runner import read_scalars

    def run(name: str, phase: str, nproc: int, *extra: str) -> Path:
        env = dict(_env(), NPROC_PER_NODE=str(nproc))
        out = tmp_path / name
        result = subprocess.run(
            ["bash", str(REPO / "launch" / "torchrun.sh"), "--config", str(CONFIGS / "tiny" / f"{phase}.yaml"),
             f"data.dir={corpus}", "data.seq_length=32", f"checkpoint.save={out / 'save'}",
             f"logging.tensorboard_dir={out / 'tb'}", "train.lr=1e-3", "train.min_lr=1e-3",
             "train.lr_warmup_iters=0", "train.micro_batch_size=2", "train.global_batch_size=2", "eval.iters=0",
             "logging.interval=1", *extra],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        return out

    start = data_parallel_run[1] / "save"
    warmup = ["train.iters=2", "checkpoint.interval=100", f"checkpoint.load_from={start}"]
    one = read_scalars(run("one", "warmup", 1, *warmup) / "tb")
    cp = read_scalars(run("cp2", "warmup", 2, *warmup, "megatron.context_parallel_size=2") / "tb")
    for tag in ("lm loss", "indexer loss"):
        assert [i for i, _ in cp[tag]] == [1, 2], tag
        assert [v for _, v in cp[tag]] == pytest.approx([v for _, v in one[tag]], rel=1e-4), tag
    assert cp["indexer loss"][1][1] != pytest.approx(cp["indexer loss"][0][1], rel=1e-6)  # the step moved it


def test_resume_with_another_module_backend(cli, corpus, tmp_path):
    record = _record(corpus, tmp_path, "pretrain")
    assert record["transformer_impl"] == "local"  # no Transformer Engine here
    record["transformer_impl"] = "transformer_engine"
    _fake_checkpoint(tmp_path / "save", record)
    expect_error(cli(*base(corpus, tmp_path)), "trained with transformer_impl 'transformer_engine'",
                 "resume with model.transformer_impl=transformer_engine")
    # a record written before the backend was kept resumes as before (no check possible)
    del record["transformer_impl"]
    (tmp_path / "save" / "mdsa_run.json").write_text(json.dumps(record))
    from megatron_dsa.train.config import load_config
    from megatron_dsa.train.preflight import preflight

    plan = preflight(load_config(CONFIGS / "tiny" / "pretrain.yaml", base(corpus, tmp_path)[2:]), check_flags=False)
    assert plan["resume"] is True


def test_two_nodes_train_checkpoint_and_resume_on_one_node(corpus, tmp_path):
    """Two "nodes" on this machine (two launch/torchrun.sh with NNODES=2, NODE_RANK 0 and 1, one
    process each) train the tiny MoE at TP=2 (a tensor-parallel group across the nodes) and
    checkpoint at iteration 4; the run goes on to iteration 5. One node (TP=1) resumes from the
    iteration-4 checkpoint through megatron-core's resharding and logs the same loss at 5."""
    run = [*base(corpus, tmp_path), "train.iters=5", "train.lr_warmup_iters=0", "train.micro_batch_size=2",
           "train.global_batch_size=2", "eval.iters=0", "checkpoint.interval=4", "logging.interval=1"]
    two = ["megatron.tensor-model-parallel-size=2", "megatron.sequence-parallel=true"]
    port = str(_free_port())
    nodes = [subprocess.Popen(["bash", str(REPO / "launch" / "torchrun.sh"), *run, *two],
                              cwd=tmp_path, env=dict(_env(), NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1",
                                                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-5000:]
    assert "tensor-model-parallel size: 2" in outputs[0] or "tensor model parallel size: 2" in outputs[0].lower()
    from megatron_dsa.train.runner import read_scalars

    two_nodes = dict(read_scalars(tmp_path / "tb")["lm loss"])
    assert sorted(two_nodes) == [1, 2, 3, 4, 5]

    # The same checkpoint at iteration 4, resumed by one node with one process.
    save = tmp_path / "save"
    shutil.rmtree(save / "iter_0000005")
    (save / "latest_checkpointed_iteration.txt").write_text("4")
    shutil.rmtree(tmp_path / "tb")
    env = dict(_env(), NNODES="1", NODE_RANK="0", NPROC_PER_NODE="1")
    result = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), *run], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    one_node = dict(read_scalars(tmp_path / "tb")["lm loss"])
    assert sorted(one_node) == [5], one_node
    assert abs(one_node[5] - two_nodes[5]) <= 1e-4 * abs(two_nodes[5]), (one_node, two_nodes)


@pytest.mark.parametrize("users", [None, "", "max_split_size_mb:512"])
def test_a_run_starts_with_expandable_segments_unless_configured(corpus, tmp_path, monkeypatch, users):
    """Long sequences fragment the caching allocator's fixed segments (the v32-slice's sparse
    step at 128K ran out of memory with 45 GiB reserved but free): a good config reaches the
    trainer with expandable segments, and a user's own allocator setting is kept."""
    from megatron_dsa.train import cli as cli_module, trainer

    if users is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", users)
    monkeypatch.delenv("RANK", raising=False)
    seen = []

    def record(*args, **kwargs):
        seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        return 0

    monkeypatch.setattr(trainer, "run", record)
    cli_module.main(base(corpus, tmp_path))
    assert seen == ["expandable_segments:True" if users is None else users]
