"""Stream tensors out of (sharded) safetensors checkpoints with numpy alone.

numpy has no bfloat16, and released Qwen3-VL weights are bf16, so the format is read here directly:
an 8-byte header length, a JSON header, then raw little-endian data. Files are memory-mapped and
each tensor is converted (bf16 -> fp32) only when the exporter asks for it, which keeps peak memory
near one tensor instead of one model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from ..errors import UserError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """Widen raw bf16 bits (uint16) to float32 exactly."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bits (round-to-nearest-even), as torch does."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file; validates the header against the file size."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise UserError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                header_bytes = f.read(n)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        if len(header_bytes) < n:
            raise UserError(f"{path}: truncated safetensors file (header cut short)")
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt safetensors header") from None
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        size = path.stat().st_size
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes, header needs {self.data_start + end})")

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        """Return the tensor (or with ``index``, its slice ``[index]`` along the first axis) as
        float32 (or its integer type), read from the file.

        A plain read rather than a memory map: mapped pages of an 8 GB checkpoint stay counted in
        the exporter's resident memory, reads leave only the tensor being converted. Slices let a
        layer's fused experts (1.2 GB of bf16 at 30B-A3B) be read one expert at a time.
        """
        e = self.entries[name]
        dt = _DTYPES.get(e["dtype"])
        if dt is None:
            raise UserError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        a, b = e["data_offsets"]
        shape = list(e["shape"])
        if index is not None:
            step = (b - a) // shape[0]
            a, b, shape = a + index * step, a + (index + 1) * step, shape[1:]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + a)
            arr = np.fromfile(f, dtype=dt, count=(b - a) // np.dtype(dt).itemsize).reshape(shape)
        if e["dtype"] == "BF16":
            return bf16_to_f32(arr)
        if e["dtype"] == "F16":
            return arr.astype(np.float32)
        return arr


class Checkpoint(Mapping[str, np.ndarray]):
    """All tensors of a Hugging Face checkpoint directory, read lazily by name."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for fname in sorted(set(weight_map.values())):
                p = directory / fname
                if not p.is_file():
                    raise UserError(f"{p}: safetensors shard listed in {index.name} is missing")
                files[fname] = SafetensorsFile(p)
            for name, fname in weight_map.items():
                if name not in files[fname].entries:
                    raise UserError(f"{directory / fname}: tensor {name} listed in the index is absent")
                self._where[name] = files[fname]
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                raise UserError(f"{directory}: no .safetensors weights found")
            for p in shards:
                f = SafetensorsFile(p)
                for name in f.entries:
                    self._where[name] = f

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].entries[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def part(self, name: str, index: int) -> np.ndarray:
        """``self[name][index]`` without reading the rest of the tensor."""
        return self._where[name].get(name, index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def check(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        """Assert every expected tensor is present with its shape (nanoGPT-style strict load)."""
        for name, shape in expected.items():
            if name not in self._where:
                raise UserError(f"{self.directory}: weight {name} is missing from the checkpoint")
            if self.shape(name) != tuple(shape):
                raise UserError(f"{self.directory}: weight {name} has shape {list(self.shape(name))}, config says {list(shape)}")


_STORED = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4), "I64": (np.int64, 8)}


def _encode(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        return f32_to_bf16(arr).tobytes()
    return np.ascontiguousarray(arr, dtype=_STORED[dtype][0]).tobytes()


def write_safetensors(path: Path, entries: Mapping[str, tuple[tuple[int, ...], str]],
                      make: Callable[[str], np.ndarray]) -> None:  # fmt: skip
    """Write a safetensors file one tensor at a time: ``entries`` maps each name to (shape, stored
    dtype "BF16" / "F16" / "F32" / "I64") for the header, ``make(name)`` gives the array when its
    turn comes. Nothing but one tensor is ever held, so checkpoints larger than memory can be
    written; the file appears under its name only once complete."""
    header: dict[str, dict] = {}
    offset = 0
    for name, (shape, dtype) in entries.items():
        size = int(np.prod(shape, dtype=np.int64)) * _STORED[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, (shape, dtype) in entries.items():
            arr = make(name)
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: made {arr.shape}, header says {shape}")
            f.write(_encode(arr, dtype))
    tmp.replace(path)


def save_safetensors(path: Path, tensors: Mapping[str, np.ndarray], bf16: bool = True, fp16: bool = False) -> None:
    """Write in-memory tensors: floats as bf16 (like released checkpoints), fp16 or fp32."""

    def stored(arr: np.ndarray) -> str:
        if arr.dtype.kind == "f":
            return "F16" if fp16 else "BF16" if bf16 else "F32"
        return {np.dtype(np.int64): "I64"}[arr.dtype]

    write_safetensors(path, {n: (tuple(a.shape), stored(a)) for n, a in tensors.items()}, tensors.__getitem__)
