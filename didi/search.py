"""Stage 1: the differentiable rank search as a LightningModule over layer batches (docs/method.md §2–3).

One continuous rank per (matrix, module); the reconstruction term is the closed form in the SVD bases, the
compression term γ·|R_now − R_tar| needs only the ranks, so every process holds every rank and computes it.
Under DDP each process sees only its share of a layer batch: its reconstruction term is multiplied by the
world size (and by the number of layer batches) so that DDP's gradient average equals the one-process
gradient of the full objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch import nn

from didi.budget import RankProblem
from didi.closed_form import GroupTerms, soft_error


@dataclass
class SearchConfig:
    """Stage-1 hyper-parameters (defaults chosen by the experiment in benchmarks/allocation.py; see README).

    Args:
        steps: optimiser steps.
        lr: Adam learning rate, in rank units per step.
        beta_start: tanh-mask sharpness at step 0 (small: gradients reach ranks far from the boundary).
        beta_end: sharpness at the last step (geometric schedule in between).
        gamma: weight of |R_now − R_tar| (R = storage ratio). `auto`: twice the exact-penalty threshold,
            i.e. twice the marginal error decrease per stored element at the target (from the closed form),
            which makes the penalty hold the budget at any target (a fixed γ does not hold low budgets).
        gamma_scale: the multiplier used by `auto`.
        rank_cap: search width K (largest rank any module can get); None: auto, 2× the largest greedy rank
            at the target, at least 32, at most what the factor store kept.
        init: `uniform` (same rank everywhere, at the target) or `full` (every module at its bound).
        layer_batch_size: matrices per global step (None: all of them in one batch).
        polish: after budgeting, exchange rank units between modules while that lowers the exact error.
        guard: keep the best (exact closed-form error) of the searched, greedy and uniform allocations, so the
            default is never worse than either baseline (the manifest records all three errors and the
            choice).
    """

    steps: int = 200
    lr: float = 0.5
    beta_start: float = 1.0
    beta_end: float = 10.0
    gamma: float | Literal["auto"] = "auto"
    gamma_scale: float = 2.0
    rank_cap: int | None = None
    init: Literal["uniform", "full"] = "uniform"
    layer_batch_size: int | None = None
    polish: bool = True
    guard: bool = True


class RankSearch(L.LightningModule):
    """Learns continuous ranks r_s [L] and r_t [L, T]; U, σ, V stay frozen (they live in the batches)."""

    #: The search bar's labels (didi.progress): the search sees the soft (tanh-masked) error and the storage
    #: ratio of continuous ranks, not the integer ranks' exact error and ratio that the summary prints after
    #: budgeting; the labels say so.
    progress_labels = {"search/rec_err": "soft_rec_err", "search/ratio": "soft_ratio"}

    def __init__(
        self,
        cfg: SearchConfig,
        problem: RankProblem,
        target_ratio: float,
        tau_total: float,
        gamma: float,
        init_s: torch.Tensor,
        init_t: torch.Tensor,
        n_batches: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.target_ratio = target_ratio
        self.tau_total = tau_total
        self.gamma = gamma
        self.n_batches = n_batches
        self.base_params = problem.base_params
        self.fixed_elements = problem.fixed_elements
        self.register_buffer("unit", problem.unit.double())
        # per-kind unit costs (bytes with experts in another dtype than the shared module); None: one cost
        self.split_units = problem.cost_s is not None or problem.cost_t is not None
        self.register_buffer("unit_s", problem.unit_s.double(), persistent=False)
        self.register_buffer("bound_s", problem.bound_s.float())
        self.register_buffer("bound_t", problem.bound_t.float())
        self.r_s = nn.Parameter(init_s.float().clone())
        self.r_t = nn.Parameter(init_t.float().clone())

    def beta(self) -> float:
        c = self.cfg
        frac = min(1.0, self.global_step / max(1, c.steps - 1))
        return c.beta_start * math.exp(frac * math.log(c.beta_end / c.beta_start))

    def ratio(self) -> torch.Tensor:
        if self.split_units:
            el = (self.unit_s * self.r_s.double() + self.unit * self.r_t.double().sum(-1)).sum()
            el = el + self.fixed_elements
        else:
            el = (self.unit * (self.r_s.double() + self.r_t.double().sum(-1))).sum() + self.fixed_elements
        return 1.0 + el / self.base_params

    def training_step(self, batch: list[tuple[torch.Tensor, GroupTerms]], batch_idx: int) -> torch.Tensor:
        beta = self.beta()
        rec = self.r_s.new_zeros(())
        for idx, terms in batch:
            idx = idx.to(self.device)
            terms = terms.to(device=self.device, dtype=torch.float32)
            rec = rec + soft_error(terms, self.r_s[idx], self.r_t[idx], beta).sum()
        rec_rel = rec / self.tau_total
        world = self.trainer.world_size if self._trainer is not None else 1
        ratio = self.ratio()
        penalty = self.gamma * (ratio - self.target_ratio).abs()
        # Under DDP the gradients are averaged over the processes. Each rank's reconstruction term touches
        # only its own matrices' ranks (zero elsewhere), and only rank 0 adds the penalty, both scaled by the
        # world size: the average is then each rank's exact contribution, and with a power-of-two world size
        # the gradient (so every rank and the artifact) is bit for bit the one-process gradient. Every rank
        # adding the penalty gave (2a + p + p)/2 ≠ a + p in float32, and Adam grew that last bit into ranks.
        own = world if self.global_rank == 0 else 0
        loss = rec_rel * (self.n_batches * world) + penalty.float() * own
        self.log(
            "search/rec_err",
            rec_rel.detach() * self.n_batches,
            reduce_fx="sum",
            sync_dist=world > 1,
            prog_bar=True,
        )
        self.log("search/ratio", ratio.detach().float(), prog_bar=True)
        self.log("search/beta", beta)
        self.log("search/loss", loss.detach(), sync_dist=world > 1)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():  # projection: ranks stay inside [0, bound]
            self.r_s.copy_(torch.minimum(self.r_s.clamp_min(0), self.bound_s))
            self.r_t.copy_(torch.minimum(self.r_t.clamp_min(0), self.bound_t))

    def configure_optimizers(self):
        return torch.optim.Adam([self.r_s, self.r_t], lr=self.cfg.lr)
