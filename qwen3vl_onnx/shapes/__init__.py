"""The "shapes" task: a tiny trained Qwen3-VL that answers questions about synthetic pictures."""
