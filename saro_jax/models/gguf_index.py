"""A GGUF file's metadata and tensor index, read in one pass over its header.

The loader (``gguf.py``) needs the architecture's scalars and where each tensor lies; the
tokenizer's arrays (SmolLM2: 49152 token strings and ~49k merges) are for the tokenizer, which
transformers reads on its own. ``gguf.GGUFReader`` builds a numpy view for every element of
every array, ~8-10 s of one core for SmolLM2 on every load; this index reads numeric arrays in
one ``np.frombuffer`` each and steps over string arrays (their length and byte extent only), so
the same header takes ~0.1 s.

The format (GGUF v2/v3, little-endian): magic ``GGUF``, uint32 version, uint64 tensor count,
uint64 key-value count; the key-values (string key, uint32 value type, value; a string is a
uint64 byte length and UTF-8 bytes; an array is a uint32 item type, a uint64 count and the
items); the tensor infos (string name, uint32 rank, uint64 dims fastest-first, uint32 ggml type,
uint64 offset); then the tensor data from the next multiple of ``general.alignment`` (default
32). Tensors are returned as views into a read-only memory map, shaped and typed as
``gguf.quants.dequantize`` expects (numpy dims slowest-first; quantized rows as bytes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from gguf import constants as gguf_constants
from gguf import quants as gguf_quants

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> numpy scalar types (8 = string and 9 = array are handled apart).
_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
            6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9

# ggml storage types held as plain numpy values (everything else is quantized blocks).
_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64}


@dataclasses.dataclass(frozen=True)
class StringArray:
  """A string array the index stepped over: its length only."""
  count: int

  def __len__(self) -> int:
    return self.count


@dataclasses.dataclass(frozen=True)
class Tensor:
  name: str
  tensor_type: gguf_constants.GGMLQuantizationType
  shape: tuple[int, ...]  # GGUF order: fastest-varying first
  data: np.ndarray  # read-only view; what gguf.quants.dequantize takes


class FormatError(ValueError):
  """The file is not a GGUF file this index can read (the message says where it stopped)."""


class GGUFIndex:
  """``metadata`` {key: value} (numbers, strings, lists; string arrays as ``StringArray``),
  ``tensors`` in file order, ``path``."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    self._buf = memoryview(self._map)
    self._pos = 0
    if bytes(self._take(4)) != MAGIC:
      raise FormatError("no GGUF magic at byte 0")
    version = self._scalar(np.uint32)
    if version not in (2, 3):
      raise FormatError(f"GGUF version {version} (this index reads 2 and 3)")
    n_tensors, n_kv = self._scalar(np.uint64), self._scalar(np.uint64)
    self.metadata: dict[str, Any] = {}
    for _ in range(n_kv):
      key = self._string()
      self.metadata[key] = self._value(self._scalar(np.uint32), key)
    infos = []
    for _ in range(n_tensors):
      name = self._string()
      rank = self._scalar(np.uint32)
      dims = tuple(int(d) for d in self._array_of(np.uint64, rank))
      infos.append((name, self._scalar(np.uint32), dims, self._scalar(np.uint64)))
    alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-self._pos // alignment) * alignment
    self.tensors: list[Tensor] = []
    seen = set()
    for name, raw_type, dims, offset in infos:
      if name in seen:
        raise FormatError(f"tensor '{name}' appears twice")
      seen.add(name)
      self.tensors.append(self._tensor(name, raw_type, dims, start + int(offset)))

  def _take(self, n: int) -> memoryview:
    end = self._pos + n
    if n < 0 or end > len(self._buf):
      raise FormatError(f"the header runs past the end of the file (byte {self._pos} + {n})")
    view = self._buf[self._pos:end]
    self._pos = end
    return view

  def _array_of(self, dtype, count: int) -> np.ndarray:
    dtype = np.dtype(dtype).newbyteorder("<")
    return np.frombuffer(self._take(dtype.itemsize * count), dtype=dtype, count=count)

  def _scalar(self, dtype):
    return self._array_of(dtype, 1)[0].item()

  def _string(self) -> str:
    raw = self._take(self._scalar(np.uint64))
    try:
      return str(raw, "utf-8")
    except UnicodeDecodeError as e:
      raise FormatError(f"a string at byte {self._pos - len(raw)} is not UTF-8") from e

  def _value(self, kind: int, key: str) -> Any:
    if kind in _SCALARS:
      return self._scalar(_SCALARS[kind])
    if kind == _STRING:
      return self._string()
    if kind != _ARRAY:
      raise FormatError(f"key '{key}' has value type {kind}, which GGUF does not define")
    item, count = self._scalar(np.uint32), self._scalar(np.uint64)
    if item in _SCALARS:
      return self._array_of(_SCALARS[item], count).tolist()
    if item == _STRING:  # step over: a uint64 length, then that many bytes, per item
      for _ in range(count):
        # inline rather than _scalar: ~100k items, and _scalar's dtype set-up triples the time
        self._pos += 8 + int(np.frombuffer(self._take(8), "<u8")[0])
      if self._pos > len(self._buf):
        raise FormatError(f"key '{key}': its strings run past the end of the file")
      return StringArray(count)
    raise FormatError(f"key '{key}' is an array of type {item} (nested arrays are not read)")

  def _tensor(self, name: str, raw_type: int, dims: tuple[int, ...], offset: int) -> Tensor:
    try:
      ggml_type = gguf_constants.GGMLQuantizationType(raw_type)
    except ValueError as e:
      raise FormatError(f"tensor '{name}' has ggml type {raw_type}, which gguf does not know") from e
    n = int(np.prod(dims, dtype=np.int64))
    shape = tuple(reversed(dims))  # numpy order: slowest first
    if ggml_type.name in _PLAIN:
      dtype = np.dtype(_PLAIN[ggml_type.name]).newbyteorder("<")
      nbytes = n * dtype.itemsize
    else:
      if ggml_type not in gguf_constants.GGML_QUANT_SIZES:
        raise FormatError(f"tensor '{name}' has ggml type {ggml_type.name}, of unknown block size")
      block, block_bytes = gguf_constants.GGML_QUANT_SIZES[ggml_type]
      dtype, nbytes = np.dtype(np.uint8), n // block * block_bytes
      shape = gguf_quants.quant_shape_to_byte_shape(shape, ggml_type)
    if offset + nbytes > len(self._map):
      raise FormatError(f"tensor '{name}' ({nbytes} bytes at {offset}) runs past the end of "
                        f"the file ({len(self._map)} bytes)")
    data = np.frombuffer(self._buf[offset:offset + nbytes], dtype=dtype).reshape(shape)
    return Tensor(name, ggml_type, dims, data)
