"""Stage-1 reconstruction error in the SVD bases (docs/method.md §3): no m×n matrix is formed per step.

For one matrix and task t, with masks dropping singular mass d_s = (1 − g(r_s))∘σ_s and
d_t = (1 − g(r_t))∘σ_t:

    ‖E_t‖² = ‖d_s‖² + ‖d_t‖² + 2 d_sᵀ C_t d_t + 2 d_sᵀ p_t + 2 d_tᵀ q_t + c_t

C_t = (U_sᵀU_t)∘(V_sᵀV_t); p_t, q_t and the constant c_t = ‖R_s + R_t‖² carry the tails beyond K (zero for a
full SVD). Everything here is batched over L matrices of one K: shapes [L, ...].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def soft_mask(r: torch.Tensor, K: int, beta: float) -> torch.Tensor:
    """g_i(r) = ½ tanh(β(r − i + ½)) + ½ for i = 1..K, shape r.shape + (K,).

    The half-index offset (the paper writes r − i) makes an integer rank r keep exactly r components once β is
    large, so rounding the searched rank means what it says.
    """
    i = torch.arange(1, K + 1, device=r.device, dtype=r.dtype)
    return 0.5 * torch.tanh(beta * (r.unsqueeze(-1) - i + 0.5)) + 0.5


def hard_mask(r: torch.Tensor, K: int) -> torch.Tensor:
    """1[i ≤ r]: the mask of an integer rank (what the stored factors keep)."""
    i = torch.arange(1, K + 1, device=r.device)
    return (i <= r.unsqueeze(-1)).to(torch.float64 if r.dtype == torch.float64 else torch.float32)


@dataclass
class GroupTerms:
    """Precomputed closed-form terms for L matrices sharing one K (all on one device/dtype).

    sigma_s [L,K], sigma_t [L,T,K], C [L,T,K,K], p, q [L,T,K], const [L,T], tau_sq [L,T] (‖τ_t‖² per matrix).
    """

    sigma_s: torch.Tensor
    sigma_t: torch.Tensor
    C: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    const: torch.Tensor
    tau_sq: torch.Tensor

    @property
    def K(self) -> int:
        return self.sigma_s.shape[-1]

    def to(self, device=None, dtype=None) -> "GroupTerms":
        return GroupTerms(
            *(getattr(self, f).to(device=device, dtype=dtype) for f in self.__dataclass_fields__)
        )


def error_from_masks(terms: GroupTerms, g_s: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """‖E_t‖² per (matrix, task), [L,T], for masks g_s [L,K] and g_t [L,T,K]."""
    d_s = (1 - g_s) * terms.sigma_s  # [L,K]
    d_t = (1 - g_t) * terms.sigma_t  # [L,T,K]
    cross = torch.einsum("lk,ltkj,ltj->lt", d_s, terms.C, d_t)
    return (
        (d_s * d_s).sum(-1, keepdim=True)
        + (d_t * d_t).sum(-1)
        + 2 * cross
        + 2 * torch.einsum("lk,ltk->lt", d_s, terms.p)
        + 2 * (d_t * terms.q).sum(-1)
        + terms.const
    )


def soft_error(terms: GroupTerms, r_s: torch.Tensor, r_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Differentiable ‖E_t‖² [L,T] for continuous ranks r_s [L], r_t [L,T]."""
    return error_from_masks(terms, soft_mask(r_s, terms.K, beta), soft_mask(r_t, terms.K, beta))


def hard_error(terms: GroupTerms, r_s: torch.Tensor, r_t: torch.Tensor) -> torch.Tensor:
    """Exact ‖E_t‖² [L,T] of truncating shared and experts at integer ranks."""
    dt = terms.sigma_s.dtype
    return error_from_masks(terms, hard_mask(r_s, terms.K).to(dt), hard_mask(r_t, terms.K).to(dt))


def literal_error(
    tau: torch.Tensor, U_s, S_s, V_s, U_t, S_t, V_t, g_s: torch.Tensor, g_t: torch.Tensor
) -> torch.Tensor:
    """The materialised loss ‖U_s diag(g_s σ_s) V_sᵀ + U_t diag(g_t σ_t) V_tᵀ − τ_t‖² [T] for one matrix.

    Shapes: tau [T,m,n], U_s [m,K], S_s [K], V_s [n,K], U_t [T,m,K], S_t [T,K], V_t [T,n,K], g_s [K],
    g_t [T,K]. Used by tests and the benchmark as the independent reference; O(m·n·K) per task.
    """
    Ms = (U_s * (g_s * S_s)) @ V_s.T
    Mt = torch.einsum("tmk,tk,tnk->tmn", U_t, g_t * S_t, V_t)
    return ((Ms + Mt - tau) ** 2).sum(dim=(-2, -1))
