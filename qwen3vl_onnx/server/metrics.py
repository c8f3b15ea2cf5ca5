"""Prometheus figures of one server (``--metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "qwen3vl_onnx_"


class Metrics:
    """Named counters, gauges and histograms the engine and the routes update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._counters = {
            "requests": Counter(PREFIX + "requests", "HTTP requests answered by route and status", ["route", "status"],
                                registry=r),
            "requests_finished": Counter(PREFIX + "requests_finished", "generations run to their end", registry=r),
            "prompt_tokens": Counter(PREFIX + "prompt_tokens", "prompt tokens of admitted requests", registry=r),
            "cached_prompt_tokens": Counter(PREFIX + "cached_prompt_tokens", "prompt tokens reused from a slot", registry=r),
            "generation_tokens": Counter(PREFIX + "generation_tokens", "tokens generated", registry=r),
        }  # fmt: skip
        self._gauges = {
            name: Gauge(PREFIX + name, help_, registry=r)
            for name, help_ in (
                ("queue_depth", "requests waiting for preparation or a slot"),
                ("busy_slots", "slots holding a request"),
                ("prefill_tokens_per_second", "prompt tokens per second of the last prefill call"),
                ("decode_tokens_per_second", "tokens per second of the last decode step (all slots)"),
            )
        }
        self._histograms = {"vision_seconds": Histogram(PREFIX + "vision_seconds", "vision encode time per request", registry=r)}

    def count(self, name: str, n: float = 1, **labels: str) -> None:
        c = self._counters[name]
        (c.labels(**labels) if labels else c).inc(n)

    def gauge(self, name: str, value: float) -> None:
        self._gauges[name].set(value)

    def observe(self, name: str, value: float) -> None:
        self._histograms[name].observe(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
