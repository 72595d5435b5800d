"""ggml's own quantize and dequantize functions through ctypes (from the engine's libggml-base)."""

from __future__ import annotations

import ctypes
import platform
from functools import lru_cache

import numpy as np

from ..core.errors import EXIT_ENGINE, CcmoeError
from .build import Engine

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """struct ggml_type_traits (ggml/include/ggml.h of the pinned llama.cpp)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


class Ggml:
    """The few ggml entry points the planner needs, bound to one engine's library."""

    def __init__(self, engine: Engine):
        suffix = ".dylib" if platform.system() == "Darwin" else ".so"
        path = engine.library_dir() / f"libggml-base{suffix}"
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise CcmoeError(f"cannot load {path} ({e})", "rebuild the engine with `ccmoe-run engine build`", EXIT_ENGINE) from None
        lib = self.lib
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    @lru_cache(maxsize=None)
    def traits(self, type_id: int) -> _TypeTraits:
        return self.lib.ggml_get_type_traits(type_id).contents

    def block_size(self, type_id: int) -> int:
        return int(self.traits(type_id).blck_size)

    def row_size(self, type_id: int, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(type_id, n_per_row))

    def requires_imatrix(self, type_id: int) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(type_id))

    def quantize(self, type_id: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> bytes:
        """Quantize float32 rows (n_rows x n_per_row) with ggml_quantize_chunk; returns the raw blocks."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows, n_per_row = rows.shape
        if n_per_row % self.block_size(type_id):
            raise CcmoeError(f"row length {n_per_row} is not a multiple of the block size {self.block_size(type_id)}",
                             "choose a type whose block size divides the row length")
        if imatrix is None and self.requires_imatrix(type_id):
            raise CcmoeError(f"{self.traits(type_id).type_name.decode()} needs an importance matrix",
                             "run `ccmoe-run profile` first or choose another type")
        self.lib.ggml_quantize_init(type_id)
        out = ctypes.create_string_buffer(self.row_size(type_id, n_per_row) * n_rows)
        imat = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            imat = imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        written = self.lib.ggml_quantize_chunk(type_id, rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out,
                                               0, n_rows, n_per_row, imat)
        return out.raw[:written]

    def dequantize(self, type_id: int, data: bytes, n_rows: int, n_per_row: int) -> np.ndarray:
        """Back to float32 with the type's own to_float."""
        to_float = self.traits(type_id).to_float
        if not to_float:
            raise CcmoeError(f"ggml type {type_id} has no to_float", "choose another type")
        out = np.empty((n_rows, n_per_row), dtype=np.float32)
        buf = ctypes.create_string_buffer(data, len(data))
        _TO_FLOAT(to_float)(ctypes.cast(buf, ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                            n_rows * n_per_row)
        return out

    def round_trip(self, type_id: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """The rows after quantize -> dequantize with this type."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        return self.dequantize(type_id, self.quantize(type_id, rows, imatrix), *rows.shape)

    def round_trip_error(self, type_id: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> float:
        """Mean squared error of quantize -> dequantize, weighted per column by the imatrix when given."""
        err = (self.round_trip(type_id, rows, imatrix) - rows) ** 2
        if imatrix is not None:
            err = err * (imatrix / max(float(imatrix.mean()), 1e-30))[None, :]
        return float(err.mean())

    def relative_error(self, type_id: int, rows: np.ndarray, column_weights: np.ndarray,
                       imatrix: np.ndarray | None = None) -> float:
        """Weighted error power over weighted signal power: comparable across tensors of any scale."""
        err = ((self.round_trip(type_id, rows, imatrix) - rows) ** 2 * column_weights[None, :]).sum()
        signal = float((rows * rows * column_weights[None, :]).sum()) or 1e-30
        return float(err) / signal
