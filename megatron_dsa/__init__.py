"""megatron-dsa: DeepSeek Sparse Attention as a megatron-core plugin.

A user builds the model with ``megatron_dsa.model`` (or plugs ``megatron_dsa.spec`` into their
own), trains it with ``megatron_dsa.train``, converts checkpoints with ``megatron_dsa.convert``
and decodes with ``megatron_dsa.inference``. The layers and where each concern lives:
docs/architecture.md.
"""
