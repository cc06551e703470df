"""DSA training on Megatron-LM's loop: pretrain (dense) -> warmup (indexer KL) -> sparse.

Entry points: ``launch/train.py`` (torchrun, one phase from a YAML config) and
``python -m megatron_dsa.train.main`` (the whole CPU demo: corpus -> three phases -> table/plot).
"""
