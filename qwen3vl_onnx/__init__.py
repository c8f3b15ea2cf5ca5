"""Qwen3-VL on ONNX Runtime: export a checkpoint to a bundle, then run it without PyTorch."""

__version__ = "0.1.0"
