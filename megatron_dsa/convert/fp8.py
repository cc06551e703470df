"""FP8 block-scaled weights, as DeepSeek's releases store them.

A quantised weight ``W`` [rows, cols] is stored as e4m3 values ``Q`` and a float32 tensor
``W_scale_inv`` [ceil(rows / b0), ceil(cols / b1)], one scale per b0 x b1 block (128 x 128 in
the releases), with ``W = Q * scale_inv`` of its block. The last block of a dimension may be
partial (DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows: 4.5 blocks of 128, 5 scale rows).
``config.json`` says so in ``quantization_config``::

    {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

The quantisation is the release's: per block, ``scale_inv = amax / 448`` (1 for an all-zero
block), ``Q = e4m3(W * 448 / amax)``, as transformers' ``Fp8Quantize`` computes it. Which
weights are quantised is the release's choice too (``quantized_in_release``): the linear
projections of attention, indexer and MLP/experts; never the embeddings, the output layer,
norms, the router or the indexer's head weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_dsa.convert.errors import ConversionError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"
FLOAT8_DTYPES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                 if hasattr(torch, n)}
# safetensors' dtype names of the float8 formats (headers are read without loading data).
FLOAT8_NAMES = {"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}

_RELEASE_QUANTIZED = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|indexer\.wq_b|indexer\.wk)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight"
)


def scale_name(weight_name: str) -> str:
    """``...proj.weight`` -> ``...proj.weight_scale_inv``."""
    return weight_name + SCALE_SUFFIX


def quantized_in_release(hf_name: str) -> bool:
    """Whether the releases store this Hugging Face tensor as FP8 with block scales."""
    return _RELEASE_QUANTIZED.fullmatch(hf_name) is not None


@dataclass(frozen=True)
class BlockScaling:
    """The block size of an FP8 block-scaled checkpoint (rows, cols)."""

    block: tuple[int, int] = (128, 128)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Optional["BlockScaling"]:
        """The checkpoint's ``quantization_config`` (None when it has none); ConversionError for
        anything but FP8 e4m3 with a block size of two positive integers."""
        q = hf.get("quantization_config")
        if q is None:
            return None
        if not isinstance(q, dict) or q.get("quant_method") != "fp8":
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise ConversionError(f"quantization_config: quant_method {method!r} is not supported (only 'fp8' "
                                  "with block scales, as the DeepSeek releases store it)")
        if q.get("fmt", "e4m3") != "e4m3":
            raise ConversionError(f"quantization_config: fmt {q.get('fmt')!r} is not supported (only 'e4m3')")
        block = q.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ConversionError(f"quantization_config: weight_block_size must be two positive integers, got {block!r}")
        return cls(tuple(block))

    def to_hf_config(self) -> dict[str, Any]:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(self.block)}

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The scale tensor's shape for a weight of ``shape`` (partial last blocks included)."""
        return math.ceil(shape[-2] / self.block[0]), math.ceil(shape[-1] / self.block[1])

    def check(self, name: str, shape: tuple[int, ...], scale_shape: Optional[tuple[int, ...]]) -> Optional[str]:
        """What is wrong with an FP8 weight and its scale, or None."""
        if scale_shape is None:
            return f"the FP8 weight {name} has no scale tensor {scale_name(name)}"
        if len(shape) != 2:
            return f"the FP8 weight {name} has shape {tuple(shape)}; block scales need a matrix"
        if tuple(scale_shape) != self.grid(shape):
            return (f"{scale_name(name)} has shape {tuple(scale_shape)}, but blocks of {list(self.block)} "
                    f"tile {name} {tuple(shape)} as {self.grid(shape)}: the block size does not fit the weight")
        return None

    def dequantize(self, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        """Q [rows, cols] (e4m3) and its block scales -> float32 W."""
        rows, cols = weight.shape
        b0, b1 = self.block
        scale = scale_inv.float().repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
        return weight.float() * scale

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W [rows, cols] -> (Q e4m3, scale_inv float32 [grid]) by the release's scheme."""
        rows, cols = weight.shape
        b0, b1 = self.block
        g0, g1 = self.grid(weight.shape)
        # One float32 copy, scaled in place: the export quantises weights one at a time, and each
        # full-size temporary (|W|, W * scale, its clamp) was another copy of the weight.
        padded = weight.new_zeros(g0 * b0, g1 * b1, dtype=torch.float32)
        padded[:rows, :cols] = weight
        blocks = padded.view(g0, b0, g1, b1)
        amax = torch.maximum(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)).neg())
        scale = torch.where(amax > 0, FP8_MAX / amax.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(amax))
        q = blocks.mul_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q.view(g0 * b0, g1 * b1)[:rows, :cols].contiguous(), (1.0 / scale).float()
