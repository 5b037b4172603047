"""Expert factors stored in a narrower dtype (docs/method.md §9): bfloat16, int8 or NF4.

A factor pair A (m×r), B (r×n) is quantized per rank unit: one scale per column of A and one per row of B,
so each rank unit costs a fixed number of bytes, scales included, and the budget stays linear in the ranks
(`didi.accounting.unit_cost`).

- `int8`: symmetric, scale = max|column| / 127 (float32), code = round(x / scale) in [−127, 127];
  |x − x̂| ≤ scale / 2.
- `nf4`: the 4-bit NormalFloat codebook of QLoRA (Dettmers et al., 2023; the 16 values bitsandbytes uses),
  absmax scale per column / row (float32), each value rounded to the nearest code; two codes per uint8,
  packed along the long dimension (rows of A, columns of B; low nibble first). |x − x̂| ≤ scale · g / 2 with g
  the codebook's largest gap (between −1 and the next code).
- `bfloat16`: a cast; no scales.

torchao and bitsandbytes are not installed here and neither is needed for this: rounding to a grid and
packing nibbles is a few tensor operations, exact and the same on every device.

The artifact keys of a quantized pair of tensor NAME (`didi.artifact` decodes them to float32 factors):

    NAME::lora_A.int8  int8 [m, r]            NAME::lora_B.int8  int8 [r, n]
    NAME::lora_A.nf4   uint8 [⌈m/2⌉, r]        NAME::lora_B.nf4   uint8 [r, ⌈n/2⌉]
    NAME::lora_A.scale float32 [r]            NAME::lora_B.scale float32 [r]

An odd m (n) stores its NF4 codes under `lora_A.nf4_odd` (`lora_B.nf4_odd`): the last byte of each column
(row) then holds one code, so the file alone says how many codes there are. A bfloat16 pair keeps the keys
`lora_A` / `lora_B` with bfloat16 tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

from didi.errors import DidiError

ExpertDtype = Literal["float32", "bfloat16", "int8", "nf4"]
EXPERT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "int8", "nf4")
#: formats with codes and per-column / per-row scales (bfloat16 and float32 are plain casts)
QUANTIZED: tuple[str, ...] = ("int8", "nf4")
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4
INT8_MAX = 127

#: QLoRA's NormalFloat-4 codebook (bitsandbytes' values), ascending; 0 is exactly representable
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
#: the largest gap between neighbouring codes: an NF4 value is off by at most scale · NF4_MAX_GAP / 2
NF4_MAX_GAP = float((NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max())


def check_expert_dtype(name: str | None, device: str | torch.device | None = None) -> str:
    """The expert dtype by name (None: float32, the factors' dtype); refuses an unknown name and bfloat16 on a
    CUDA device without bfloat16 support, naming the option and what was found."""
    if name is None:
        return "float32"
    if name not in EXPERT_DTYPES:
        raise DidiError(f"expert_dtype: expected one of {', '.join(EXPERT_DTYPES)}, found {name!r}")
    if name == "bfloat16" and device is not None and torch.device(device).type == "cuda":
        if not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
            raise DidiError(
                f"expert_dtype bfloat16: the refinement device {device} has no bfloat16 support "
                f"(torch.cuda.is_bf16_supported() is False); use --expert_dtype int8 or nf4, or refine on "
                f"the CPU (--trainer.accelerator cpu)"
            )
    return name


# --------------------------------------------------------------------------- columns: one scale per column
def _absmax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(0) if x.shape[0] else x.new_zeros(x.shape[1])


def quantize_columns(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [k, r] (int8; NF4: uint8 indices 0..15, unpacked) and float32 scales [r] of x [k, r], one scale
    per column."""
    x = x.float()
    amax = _absmax(x)
    if fmt == "int8":
        scale = (amax / INT8_MAX).to(SCALE_DTYPE)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(x / safe).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return codes, scale
    if fmt == "nf4":
        scale = amax.to(SCALE_DTYPE)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        book = NF4_CODEBOOK.to(x.device)
        mids = (book[1:] + book[:-1]) / 2
        codes = torch.bucketize((x / safe).clamp_(-1, 1).contiguous(), mids).to(torch.uint8)
        return codes, scale
    raise DidiError(f"expert_dtype: {fmt!r} has no codes (quantized formats: {', '.join(QUANTIZED)})")


def dequantize_columns(codes: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """x̂ [k, r] (float32) from `quantize_columns`' codes and scales."""
    if fmt == "int8":
        return codes.float() * scale.float()
    if fmt == "nf4":
        return NF4_CODEBOOK.to(codes.device)[codes.long()] * scale.float()
    raise DidiError(f"expert_dtype: {fmt!r} has no codes (quantized formats: {', '.join(QUANTIZED)})")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [k, r] → [⌈k/2⌉, r]: rows 2i (low nibble) and 2i + 1 (high nibble) in one byte; an
    odd k pads the last high nibble with 0."""
    if codes.shape[0] % 2:
        codes = torch.cat([codes, codes.new_zeros(1, codes.shape[1])])
    return (codes[0::2] | (codes[1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, odd: bool) -> torch.Tensor:
    """`pack_nibbles`' inverse: [⌈k/2⌉, r] → [k, r] (k = 2·rows − 1 when `odd`)."""
    out = torch.stack([packed & 15, packed >> 4], dim=1).reshape(2 * packed.shape[0], packed.shape[1])
    return out[: out.shape[0] - 1] if odd else out


def fake_quantize(x: torch.Tensor, fmt: str, dim: int = 0) -> torch.Tensor:
    """x after the round trip through `fmt` (same dtype and device as x): one scale per slice along `dim`'s
    complement, i.e. `dim` = 0 for A's columns, 1 for B's rows. float32 is the identity."""
    if fmt == "float32":
        return x
    if fmt == "bfloat16":
        return x.to(torch.bfloat16).to(x.dtype)
    y = x if dim == 0 else x.T
    codes, scale = quantize_columns(y, fmt)
    z = dequantize_columns(codes, scale, fmt).to(x.dtype)
    return z if dim == 0 else z.T


def fake_quantize_pair(A: torch.Tensor, B: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Â, B̂): A per column, B per row."""
    return fake_quantize(A, fmt, 0), fake_quantize(B, fmt, 1)


# ----------------------------------------------------------------------------------- artifact tensors
def pair_tensors(A: torch.Tensor, B: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The stored tensors of a factor pair in `fmt`, keyed by artifact suffix (see the module doc)."""
    if fmt == "float32":
        return {"lora_A": A.float().contiguous(), "lora_B": B.float().contiguous()}
    if fmt == "bfloat16":
        return {"lora_A": A.to(torch.bfloat16).contiguous(), "lora_B": B.to(torch.bfloat16).contiguous()}
    ca, sa = quantize_columns(A, fmt)
    cb, sb = quantize_columns(B.T, fmt)
    if fmt == "int8":
        return {
            "lora_A.int8": ca.contiguous(),
            "lora_B.int8": cb.T.contiguous(),
            "lora_A.scale": sa,
            "lora_B.scale": sb,
        }
    m, n = A.shape[0], B.shape[1]
    return {
        "lora_A.nf4_odd" if m % 2 else "lora_A.nf4": pack_nibbles(ca),
        "lora_B.nf4_odd" if n % 2 else "lora_B.nf4": pack_nibbles(cb).T.contiguous(),
        "lora_A.scale": sa,
        "lora_B.scale": sb,
    }


#: artifact suffixes of quantized codes → (format, factor, odd)
CODE_SUFFIXES: dict[str, tuple[str, str, bool]] = {
    "lora_A.int8": ("int8", "A", False),
    "lora_B.int8": ("int8", "B", False),
    "lora_A.nf4": ("nf4", "A", False),
    "lora_B.nf4": ("nf4", "B", False),
    "lora_A.nf4_odd": ("nf4", "A", True),
    "lora_B.nf4_odd": ("nf4", "B", True),
}
SCALE_SUFFIXES = ("lora_A.scale", "lora_B.scale")


def code_count(suffix: str, shape: tuple[int, ...]) -> int:
    """How many values a stored codes tensor holds (NF4: two per byte, minus the padding of an odd length)."""
    numel = 1
    for s in shape:
        numel *= s
    fmt, factor, odd = CODE_SUFFIXES[suffix]
    if fmt != "nf4":
        return numel
    r = shape[1] if factor == "A" else shape[0]
    return 2 * numel - (r if odd else 0)


def dequantize_factor(suffix: str, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A (m×r) or B (r×n) in float32 from its stored codes (key suffix `suffix`) and scales."""
    fmt, factor, odd = CODE_SUFFIXES[suffix]
    if factor == "B":
        codes = codes.T
    if fmt == "nf4":
        codes = unpack_nibbles(codes, odd)
    x = dequantize_columns(codes, scale, fmt)
    return x if factor == "A" else x.T.contiguous()


def stored_pair(
    A: torch.Tensor, B: torch.Tensor, fmt: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the stored tensors of `pair_tensors`, Â, B̂): Â and B̂ are decoded from exactly those tensors, in A's
    dtype and device, so an error computed from them is the error of what the artifact holds."""
    tensors = pair_tensors(A, B, fmt)
    if fmt in ("float32", "bfloat16"):
        return tensors, tensors["lora_A"].to(A.dtype), tensors["lora_B"].to(B.dtype)
    a_key = next(k for k in tensors if k.startswith("lora_A.") and k != "lora_A.scale")
    b_key = next(k for k in tensors if k.startswith("lora_B.") and k != "lora_B.scale")
    A_hat = dequantize_factor(a_key, tensors[a_key], tensors["lora_A.scale"]).to(A.dtype)
    B_hat = dequantize_factor(b_key, tensors[b_key], tensors["lora_B.scale"]).to(B.dtype)
    return tensors, A_hat, B_hat
