"""ggml's quantize/dequantize through ctypes: the real formats, from the engine's own library."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.engine.ggml import Ggml

# bits per weight of the pinned llama.cpp's formats (shared/engine-notes.md)
BPW = {"Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5, "IQ4_XS": 4.25, "Q3_K": 3.4375, "Q2_K": 2.625,
       "IQ3_XXS": 3.0625, "IQ2_XS": 2.3125, "IQ2_XXS": 2.0625, "IQ1_M": 1.75, "IQ1_S": 1.5625}


@pytest.fixture(scope="module")
def ggml(engine):
    return Ggml(engine)


def _tid(name: str) -> int:
    return gguf.GGMLQuantizationType[name].value


@pytest.mark.slow
def test_sizes_match_the_formats(ggml):
    rows = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    imatrix = np.ones(512, dtype=np.float32)
    for name, bpw in BPW.items():
        data = ggml.quantize(_tid(name), rows, imatrix)
        assert len(data) * 8 / rows.size == pytest.approx(bpw), name
        assert ggml.row_size(_tid(name), 512) * 8 == pytest.approx(bpw * 512)


@pytest.mark.slow
def test_error_falls_as_bits_rise(ggml):
    rows = np.random.default_rng(1).standard_normal((32, 1024)).astype(np.float32)
    imatrix = np.random.default_rng(2).uniform(0.1, 3.0, 1024).astype(np.float32)
    ladder = ["IQ1_S", "IQ2_XXS", "Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"]
    errors = [ggml.round_trip_error(_tid(t), rows, imatrix) for t in ladder]
    assert errors == sorted(errors, reverse=True), dict(zip(ladder, errors))
    assert errors[-1] < 1e-4 and errors[0] > 0.05


def test_imatrix_weighting_helps_the_columns_it_marks(ggml):
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((32, 256)).astype(np.float32)
    imatrix = np.full(256, 0.01, dtype=np.float32)
    imatrix[:32] = 100.0                       # these columns matter
    t = _tid("Q3_K")
    plain = ggml.dequantize(t, ggml.quantize(t, rows), 32, 256)
    guided = ggml.dequantize(t, ggml.quantize(t, rows, imatrix), 32, 256)
    assert ((guided - rows)[:, :32] ** 2).mean() < ((plain - rows)[:, :32] ** 2).mean()


def test_refusals(ggml):
    rows = np.zeros((2, 512), dtype=np.float32)
    with pytest.raises(CcmoeError, match="needs an importance matrix"):
        ggml.quantize(_tid("IQ2_XXS"), rows)
    with pytest.raises(CcmoeError, match="not a multiple of the block size"):
        ggml.quantize(_tid("Q4_K"), np.zeros((2, 192), dtype=np.float32))
