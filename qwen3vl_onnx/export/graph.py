"""A small ONNX graph writer: ops by name, weights streamed straight to an external-data file.

Graph modules call ``g.op("MatMul", x, w)`` and get the output name back, so a layer reads like
its maths. Weights go to disk the moment they are added (page-aligned so ONNX Runtime can map
them), which is what lets an 8B checkpoint export without holding the model in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .quant import quantize, quantize_per_channel

OPSET = 23
MS_DOMAIN = "com.microsoft"
_ALIGN = 4096

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64

Shape = list[int | str]


def _onnx_type(t: int | type[np.generic]) -> int:
    return t if isinstance(t, int) else helper.np_dtype_to_tensor_dtype(np.dtype(t))


class Graph:
    """Collects nodes, inputs, outputs and initializers of one ONNX model."""

    def __init__(self, name: str, path: Path, weight_dtype: type = np.float32):
        self.name = name
        self.path = path
        self.weight_dtype = np.dtype(weight_dtype)
        self.data_name = path.name + ".data"
        self._data = open(path.parent / self.data_name, "wb")
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self.uses_ms_domain = False

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, elem_type: int | type[np.generic], shape: Shape) -> str:
        """Declare a graph input (element type as an ONNX type or a numpy dtype)."""
        self.inputs.append(helper.make_tensor_value_info(name, _onnx_type(elem_type), shape))
        return name

    def output(self, value: str, name: str, elem_type: int | type[np.generic], shape: Shape) -> None:
        """Expose ``value`` as graph output ``name`` (renaming through Identity when needed)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, _onnx_type(elem_type), shape))

    def op(self, op_type: str, *inputs: str, n_out: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        """Append a node; returns its output name (or names when ``n_out`` > 1)."""
        domain = attrs.pop("domain", "")
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        base = name or self._fresh(op_type.lower())
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype: type = np.int64) -> str:
        """A small inline constant (shapes, axes, scalars); identical constants are shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._fresh("const")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, arr: np.ndarray, dtype: type | None = None) -> str:
        """Write a tensor to the external-data file now and reference it from the graph.

        Stored in ``dtype`` (default: the graph's weight dtype); a float16 weight is cast back to
        float32 in the graph so CPU kernels compute in fp32 while the file stays half size.
        """
        return self.weight_parts(name, arr.shape, [arr], dtype)

    def weight_parts(self, name: str, shape: Sequence[int], parts: Iterable[np.ndarray], dtype: type | None = None) -> str:
        """``weight`` for a tensor that arrives in pieces along its first axis (one expert at a
        time), each written as it comes, so the whole tensor is never in memory."""
        dt = np.dtype(dtype) if dtype is not None else self.weight_dtype
        stored = name if dt == np.float32 or dt.kind != "f" else name + "_fp16"
        pad = -self._offset % _ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        length = 0
        for part in parts:
            blob = np.ascontiguousarray(part, dtype=dt).tobytes()
            self._data.write(blob)
            length += len(blob)
        if length != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise ValueError(f"{name}: parts hold {length} bytes, shape {list(shape)} needs more or fewer")
        t = onnx.TensorProto()
        t.name = stored
        t.data_type = helper.np_dtype_to_tensor_dtype(dt)
        t.dims.extend(shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(self._offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self._offset += length
        self.initializers.append(t)
        if stored != name:
            return self.op("Cast", stored, to=FLOAT, name=name)
        return name

    def stored(self, name: str) -> dict | None:
        """Where weight ``name`` lies in the data file ({"offset", "shape"}), None if there is none."""
        for t in self.initializers:
            if t.name == name and t.data_location == onnx.TensorProto.EXTERNAL:
                where = {e.key: e.value for e in t.external_data}
                return {"offset": int(where["offset"]), "shape": list(t.dims)}
        return None

    def save(self) -> None:
        """Write the .onnx file (the data file has been written as weights arrived)."""
        self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qwen3vl-onnx")
        model.ir_version = 10
        onnx.save_model(model, str(self.path))

    # ---- building blocks shared by the vision and text graphs ----

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str, int8: bool = False) -> str:
        """x @ W^T + b for a torch ``nn.Linear`` weight of shape (out, in); ``int8`` runs it as int8
        per channel with dynamically quantized inputs (``linear_int8_dynamic``)."""
        if int8:
            return self.linear_int8_dynamic(x, w, b, name)
        y = self.op("MatMul", x, self.weight(name + ".weight", w.T))
        if b is not None:
            y = self.op("Add", y, self.weight(name + ".bias", b, np.float32))
        return y

    def linear_int8_dynamic(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        """x @ W^T (+ b) through DynamicQuantizeMatMul: MLAS runs it as a u8 x s8 GEMM, for large-M
        matmuls such as a vision tower's, where MatMulNBits' int8 path is slower. Weight codes stay
        within ``U8S8_WEIGHT_MAX`` so CPUs without VNNI compute it without int16 saturation."""
        q, scale = quantize_per_channel(w)
        ins = [x, self.weight(name + ".qweight", q, np.int8), self.weight(name + ".scale", scale, np.float32),
               self.weight(name + ".zero_point", np.zeros(q.shape[1], np.int8), np.int8)]  # fmt: skip
        if b is not None:
            ins.append(self.weight(name + ".bias", b, np.float32))
        return self.op("DynamicQuantizeMatMul", *ins, domain=MS_DOMAIN)

    def linear_int8_rows(self, x: str, w: np.ndarray, name: str) -> str:
        """x @ W^T with int8 per-channel weights and x quantized per row (per token) at run time.

        Why per row: ``DynamicQuantizeMatMul`` quantizes the whole activation tensor with one scale,
        set by its largest value in any token; per row, each token's step follows its own largest
        value, which keeps outlier channels from flattening every other token. A blocked
        QuantizeLinear (one block = the row) gives uint8 with zero point 128, MatMulIntegerToFloat
        runs MLAS's u8 x s8 GEMM (about twice MatMulNBits' speed at prompt sizes) and applies the
        weight scales, and the row scales multiply the result. Weight codes as in
        ``linear_int8_dynamic``.
        """
        k = w.shape[1]
        q, scale = quantize_per_channel(w)
        row = self.op("Div", self.op("Max", self.op("ReduceMax", self.op("Abs", x), self.const([-1]), keepdims=1),
                                     self.const(1e-30, np.float32)), self.const(127.0, np.float32))  # fmt: skip
        zp = self.op("Expand", self.const(128, np.uint8), self.op("Shape", row))
        xq = self.op("QuantizeLinear", x, row, zp, axis=-1, block_size=k)
        y = self.op(
            "MatMulIntegerToFloat", xq, self.weight(name + ".qweight", q, np.int8), self.const(1.0, np.float32),
            self.weight(name + ".scale", scale, np.float32), self.const(128, np.uint8), domain=MS_DOMAIN,
        )  # fmt: skip
        return self.op("Mul", y, row)

    def linear_nbits(self, x: str, w: np.ndarray, name: str, bits: int, block_size: int, accuracy_level: int) -> str:
        """x @ W^T with W block-quantized for ONNX Runtime's MatMulNBits (weight-only int4/int8)."""
        q = quantize(w, bits, block_size)
        ins = [x, self.weight(name + ".qweight", q.packed, np.uint8), self.weight(name + ".scales", q.scales, np.float32)]
        if q.zero_points is not None:
            ins.append(self.weight(name + ".zero_points", q.zero_points, np.uint8))
        return self.op(
            "MatMulNBits", *ins, domain=MS_DOMAIN, K=q.k, N=q.n, bits=bits, block_size=block_size, accuracy_level=accuracy_level
        )

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, name: str, eps: float = 1e-6) -> str:
        return self.op(
            "LayerNormalization",
            x,
            self.weight(name + ".weight", w, np.float32),
            self.weight(name + ".bias", b, np.float32),
            axis=-1,
            epsilon=eps,
        )

    def rms_norm(self, x: str, w: np.ndarray, name: str, eps: float) -> str:
        """weight * x / sqrt(mean(x^2) + eps) over the last axis, in fp32 as transformers does."""
        return self.op("RMSNormalization", x, self.weight(name + ".weight", w, np.float32), axis=-1, epsilon=eps)

    def rotate_half(self, x: str) -> str:
        """cat(-x2, x1) along the last axis."""
        x1, x2 = self.op("Split", x, axis=-1, num_outputs=2, n_out=2)
        return self.op("Concat", self.op("Neg", x2), x1, axis=-1)

    def rotary(self, x: str, cos: str, sin: str) -> str:
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", self.rotate_half(x), sin))

    def gelu(self, x: str, approximate: str) -> str:
        return self.op("Gelu", x, approximate=approximate)
