"""Qwen3-VL on ONNX Runtime: export a checkpoint to a bundle, then run it without PyTorch."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    """``from qwen3vl_onnx import Pipeline`` without importing ONNX Runtime for ``--version`` or export."""
    if name == "Pipeline":
        from .runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
