"""Checkpoint conversion: megatron-dsa dist checkpoints <-> Hugging Face DeepseekV32ForCausalLM.

CLI: ``python -m megatron_dsa.convert to-hf|from-hf ...`` (see ``__main__``). Python API:
``export_to_hf``, ``import_from_hf``, ``load_model`` (our model with a checkpoint's weights).
Every failure on bad input is one ``ConversionError`` raised before anything is written.
"""

from megatron_dsa.convert.checkpoint import load_model, resolve_checkpoint_dir, save_model_checkpoint
from megatron_dsa.convert.errors import ConversionError
from megatron_dsa.convert.hf import export_to_hf, import_from_hf

__all__ = [
    "ConversionError",
    "export_to_hf",
    "import_from_hf",
    "load_model",
    "resolve_checkpoint_dir",
    "save_model_checkpoint",
]
