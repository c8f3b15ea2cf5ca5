"""``qwen3vl-onnx serve``: an OpenAI-compatible HTTP server over a bundle (the ``[server]`` extra).

Layers: ``settings`` (the command's options), ``schemas`` (request and response bodies, the
OpenAPI document), ``media`` (image and video URLs, confined and limited), ``engine`` (slots in one
KV cache, continuous batching), ``metrics`` (Prometheus), ``app`` (routes, auth, errors). The core
runtime never imports this package.
"""
