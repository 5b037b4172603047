"""Storage ratios the papers report (docs/method.md §4: ViT-B/32, 8 tasks) beside ours, with why they differ.

Ours is always `didi.accounting` on the artifact: 1 + stored elements / |θ0| (lora r(m+n), dense numel, mask
numel/32, scalar 1, fold 0). `compare_ratio(method, ours, hyper)` gives the published number (None when the
paper states none) and a one-line reason where our accounting differs.
"""

from __future__ import annotations

#: method (paper name) -> published ratio
PUBLISHED: dict[str, float] = {
    "WEMoE": 6.27,
    "SMILE": 3.07,
    "TALL-Mask+TIES": 2.5,
    "Twin-Merging": 2.25,
    "EMR-Merging": 4.0,
    "FREE": 2.16,
    "TSV-C": 2.08,
    "DiDi-S": 1.24,
    "DiDi-M": 1.4,
    "DiDi-L": 2.0,
}

#: registry name -> (paper name, reason our ratio differs; "" where it matches by construction)
REASONS: dict[str, tuple[str | None, str]] = {
    "averaging": (None, "a static merge stores one model: 1.0 by construction"),
    "task_arithmetic": (None, "a static merge stores one model: 1.0 by construction"),
    "ties": (None, "a static merge stores one model: 1.0 by construction"),
    "tsv_m": (None, "a static merge stores one model: 1.0 by construction"),
    "tall_masks": (
        "TALL-Mask+TIES",
        "we count θ0 (1) + τ_MTL once (1) + T masks at 1 bit (T/32: 2.25 at "
        "T = 8); the published 2.5 counts more than that (its breakdown is not stated)",
    ),
    "emr": (
        "EMR-Merging",
        "we price a mask at 1 bit per entry (T/32); the published 4 matches 1-byte bool "
        "masks (8 × 1/4 = 2) + τ_uni (1) + θ0 (1)",
    ),
    "tsv_c": (
        "TSV-C",
        "we price each task's rank-⌊k/T⌋ factors at r(m+n) elements (≈ 2× the matrix in "
        "total for square matrices); the published 2.08 counts them as 1/T of the matrix per task",
    ),
    "twin": (
        "Twin-Merging",
        "we fold the shared TA merge into the base (cost 0) and price each exclusive "
        "LoRA at r(m+n) with r = 10 % of min(m, n); the paper counts the compressed vectors otherwise",
    ),
    "flexmerge": (
        None,
        "our ratio equals FlexMerge's size (Σ clusters × block numel) when its blocks cover "
        "the model; blocks no task changed cost nothing here",
    ),
    "merge": (
        None,
        "a MERGE front point stores 1 + Σ_c (groups_c − 1)·numel_c / |θ0| (each component's largest group "
        "folded, as FlexMerge); the library of a search holds several points",
    ),
    "didi": ("DiDi", "same accounting as the paper (ranks r(m+n), non-matrix deltas folded)"),
    "didi_uniform": ("DiDi", "same accounting as the paper (ranks r(m+n), non-matrix deltas folded)"),
    "didi_greedy": ("DiDi", "same accounting as the paper (ranks r(m+n), non-matrix deltas folded)"),
    "didi_norefine": ("DiDi", "same accounting as the paper (ranks r(m+n), non-matrix deltas folded)"),
    "didi_folded": (
        "DiDi",
        "the paper's accounting, but the shared part is folded densely into the stored base "
        "(θ0 + M_s replaces θ0: cost 0) instead of a low-rank module paid for in the budget",
    ),
}


def _didi_label(budget: float | None) -> str | None:
    for label, r in (("DiDi-S", 1.24), ("DiDi-M", 1.4), ("DiDi-L", 2.0)):
        if budget is not None and abs(float(budget) - r) < 1e-9:
            return label
    return None


def compare_ratio(method: str, hyper: dict | None = None) -> dict:
    """{"paper": name or None, "published": ratio or None, "reason": text} for registry method `method`."""
    hyper = hyper or {}
    if method == "didi" and hyper.get("shared") == "folded":  # `didi merge --shared folded`
        method = "didi_folded"
    paper, reason = REASONS.get(method, (None, "no published ratio for this method"))
    if paper == "DiDi":
        paper = _didi_label(hyper.get("budget"))
        if paper is None:
            reason = "the paper reports DiDi at 1.24, 1.4 and 2.0 only" + (
                f"; {reason}" if method == "didi_folded" else ""
            )
    if method == "flexmerge" and hyper.get("target") is not None:
        return {"paper": "FlexMerge", "published": float(hyper["target"]), "reason": reason}
    if method == "tall_masks" and hyper.get("mtl") != "ties":
        reason = "the paper's 2.5 is for TALL-Mask+TIES; " + reason
    return {
        "paper": paper,
        "published": PUBLISHED.get(paper)
        if paper
        else (1.0 if method in ("averaging", "task_arithmetic", "ties", "tsv_m") else None),
        "reason": reason,
    }


def artifact_ratio_row(manifest: dict) -> dict:
    """Ours beside the published ratio for an artifact's manifest (what `didi inspect` can print)."""
    m = manifest.get("method", {})
    name = m.get("registry_name", m.get("name", ""))
    row = compare_ratio(name, m.get("hyper_parameters", {}))
    return {"method": name, "ours": float(manifest["storage"]["ratio"]), **row}
