"""Stream tensors out of (sharded) safetensors checkpoints with numpy alone.

numpy has no bfloat16, and released Qwen3-VL weights are bf16, so the format is read here directly:
an 8-byte header length, a JSON header, then raw little-endian data. Files are memory-mapped and
each tensor is converted (bf16 -> fp32) only when the exporter asks for it, which keeps peak memory
near one tensor instead of one model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
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

    def get(self, name: str) -> np.ndarray:
        """Return the tensor as float32 (or its integer type), read from the file.

        A plain read rather than a memory map: mapped pages of an 8 GB checkpoint stay counted in
        the exporter's resident memory, reads leave only the tensor being converted.
        """
        e = self.entries[name]
        dt = _DTYPES.get(e["dtype"])
        if dt is None:
            raise UserError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        a, b = e["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + a)
            arr = np.fromfile(f, dtype=dt, count=(b - a) // np.dtype(dt).itemsize).reshape(e["shape"])
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


def save_safetensors(path: Path, tensors: Mapping[str, np.ndarray], bf16: bool = True, fp16: bool = False) -> None:
    """Write a safetensors file: float tensors as bf16 (like released checkpoints), fp16 or fp32."""
    header: dict[str, dict] = {}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        if arr.dtype.kind == "f" and fp16:
            data, dtype = np.ascontiguousarray(arr, dtype=np.float16), "F16"
        elif arr.dtype.kind == "f" and bf16:
            data, dtype = f32_to_bf16(arr), "BF16"
        else:
            data = np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype.kind == "f" else arr.dtype)
            dtype = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[data.dtype]
        blob = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for blob in blobs:
            f.write(blob)
