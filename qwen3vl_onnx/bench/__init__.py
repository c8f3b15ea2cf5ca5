"""``qwen3vl-onnx bench``: speed figures of a bundle and of its peers on the same random checkpoint.

Never imported by the exporter or the runtime; it imports them.
"""
