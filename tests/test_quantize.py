"""The expert quantizer (`didi.quantize`): round-trip error bounds, nibble packing, the stored bytes of a rank
unit against a hand count, the artifact decoder's dequantization, the quantization-aware ALS block and the
refusals of a dtype the run cannot use."""

from __future__ import annotations

import pytest
import torch

from didi.accounting import unit_cost
from didi.artifact import LoRA, decode_terms
from didi.errors import DidiError
from didi.quantize import (
    NF4_CODEBOOK,
    NF4_MAX_GAP,
    check_expert_dtype,
    code_count,
    fake_quantize,
    fake_quantize_pair,
    pack_nibbles,
    pair_tensors,
    quantize_columns,
    stored_pair,
    unpack_nibbles,
)
from didi.refine import quantized_fit


def _factor(m: int, r: int, seed: int = 0) -> torch.Tensor:
    """Columns of very different magnitudes (1e-3 … 1e2) and one zero column: per-column scales matter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, r, generator=g) * torch.logspace(-3, 2, r)[None, :]
    x[:, r // 2] = 0.0
    return x


def test_int8_round_trip_within_half_a_step():
    A = _factor(37, 6)
    codes, scale = quantize_columns(A, "int8")
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    step = A.abs().amax(0) / 127  # the step computed here, not by the quantizer
    torch.testing.assert_close(scale, step)
    err = (A - fake_quantize(A, "int8", 0)).abs()
    assert bool((err <= step[None, :] / 2 * (1 + 1e-5) + 1e-30).all())
    assert int(codes.abs().max()) == 127 and bool((codes[:, 3] == 0).all())  # the zero column stays zero
    # B is quantized per row: the same bound with one step per row
    B = _factor(29, 5, seed=1).T
    step_b = B.abs().amax(1) / 127
    assert bool(((B - fake_quantize(B, "int8", 1)).abs() <= step_b[:, None] / 2 * (1 + 1e-5) + 1e-30).all())


def test_nf4_round_trip_within_half_the_largest_codebook_gap():
    assert NF4_MAX_GAP == pytest.approx(1.0 - 0.6961928009986877)  # the gap between −1 and the next code
    assert len(NF4_CODEBOOK) == 16 and float(NF4_CODEBOOK[7]) == 0.0
    A = _factor(41, 7, seed=2)
    amax = A.abs().amax(0)
    err = (A - fake_quantize(A, "nf4", 0)).abs()
    assert bool((err <= amax[None, :] * NF4_MAX_GAP / 2 * (1 + 1e-5) + 1e-30).all())
    # every value is the nearest code: no other code of the column's grid is closer
    grid = NF4_CODEBOOK[None, None, :] * amax[None, :, None]  # [1, r, 16]
    best = (A[:, :, None] - grid).abs().min(-1).values
    torch.testing.assert_close(err, best, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 6, 7])
def test_nibbles_pack_two_codes_per_byte_and_unpack_exactly(k):
    codes = torch.randint(0, 16, (k, 3), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == ((k + 1) // 2, 3)
    assert int(packed[0, 0]) == int(codes[0, 0]) + (16 * int(codes[1, 0]) if k > 1 else 0)  # low nibble first
    assert torch.equal(unpack_nibbles(packed, odd=bool(k % 2)), codes)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "nf4"])
@pytest.mark.parametrize("m,n", [(12, 8), (13, 9)])
def test_stored_pair_costs_its_unit_price_and_decodes_to_the_fake_quantized_pair(fmt, m, n):
    r = 3
    A, B = _factor(m, r, 3), _factor(n, r, 4).T
    tensors = pair_tensors(A, B, fmt)
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    by_hand = {
        "float32": 4 * r * (m + n),
        "bfloat16": 2 * r * (m + n),
        "int8": r * (m + n) + 2 * 4 * r,
        "nf4": r * ((m + 1) // 2 + (n + 1) // 2) + 2 * 4 * r,
    }[fmt]
    assert nbytes == by_hand == r * unit_cost(m, n, fmt, "bytes")
    codes = {k: v for k, v in tensors.items() if k in ("lora_A.int8", "lora_A.nf4", "lora_A.nf4_odd")}
    for k, v in codes.items():
        assert code_count(k, tuple(v.shape)) == m * r
    assert (m % 2 == 1) == ("lora_A.nf4_odd" in tensors) or fmt != "nf4"
    # the artifact's one decoder turns the stored tensors into float32 factors = the fake-quantized pair
    keyed = {f"w::{k}": v for k, v in tensors.items()}
    (term,) = decode_terms(keyed, "tasks/a.safetensors", "expert")["w"]
    assert isinstance(term, LoRA)
    A_q, B_q = fake_quantize_pair(A, B, fmt)
    torch.testing.assert_close(term.A.float(), A_q, rtol=0, atol=0)
    torch.testing.assert_close(term.B.float(), B_q, rtol=0, atol=0)
    _, A_s, B_s = stored_pair(A, B, fmt)
    assert torch.equal(A_s, A_q) and torch.equal(B_s, B_q)


def test_quantized_pair_with_a_missing_companion_is_refused():
    tensors = {f"w::{k}": v for k, v in pair_tensors(torch.randn(4, 2), torch.randn(2, 5), "int8").items()}
    del tensors["w::lora_B.scale"]
    with pytest.raises(DidiError, match="lora_B.scale"):
        decode_terms(tensors, "tasks/a.safetensors", "expert")


def test_quantized_fit_beats_rounding_the_truncated_svd():
    """The quantization-aware fit (each factor solved against the other's dequantized values) is never worse
    than rounding the float truncated SVD, and what it returns is on the int8 grid with its true error."""
    g = torch.Generator().manual_seed(5)
    X = (
        torch.randn(40, 30, generator=g)
        @ torch.diag(torch.logspace(0, -2, 30))
        @ torch.randn(30, 30, generator=g)
    )
    U, S, Vh = torch.linalg.svd(X)
    r = 6
    A, B = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
    for fmt in ("int8", "nf4"):
        rounded = ((X - torch.mm(*fake_quantize_pair(A, B, fmt))) ** 2).sum()
        A_q, B_q, e = quantized_fit(X, A, B, fmt)
        assert float(e) == pytest.approx(float(((X - A_q @ B_q) ** 2).sum()), rel=1e-5)
        assert float(e) <= float(rounded) * (1 + 1e-6)
        torch.testing.assert_close(fake_quantize(A_q, fmt, 0), A_q, rtol=1e-6, atol=0)  # already on the grid
        torch.testing.assert_close(fake_quantize(B_q, fmt, 1), B_q, rtol=1e-6, atol=0)
        assert float(e) >= float((S[r:] ** 2).sum()) * (1 - 1e-5)  # never below the float optimum


def test_expert_dtype_refusals(monkeypatch):
    assert check_expert_dtype(None) == "float32" and check_expert_dtype("nf4", "cuda") == "nf4"
    with pytest.raises(
        DidiError, match="expert_dtype: expected one of float32, bfloat16, int8, nf4, found 'int4'"
    ):
        check_expert_dtype("int4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(DidiError, match="bfloat16 support"):
        check_expert_dtype("bfloat16", "cuda")
    assert check_expert_dtype("bfloat16", "cpu") == "bfloat16"
