"""DiDi and its ablations through the method registry: same artifact kind, exact budget, ablation applied."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from didi.artifact import load_artifact
from didi.backbones import Adapter, Zoo
from didi.methods import apply_method, get_method


@pytest.mark.parametrize(
    "method,allocation,optimizer",
    [
        ("didi_uniform", "uniform", "als"),
        ("didi_greedy", "greedy", "als"),
        ("didi_norefine", "search", "none"),
    ],
)
def test_didi_variants(tiny_zoo, fast, tmp_path, method, allocation, optimizer):
    dcfg, scfg, rcfg, tcfg = fast
    base, tasks = tiny_zoo
    zoo = Zoo(Adapter(), base, tasks)
    opts = {
        "budget": 1.5,
        "decompose": asdict(dcfg),
        "search": asdict(scfg),
        "refine": asdict(rcfg),
        "trainer": asdict(tcfg),
    }
    path = apply_method(method, zoo, tmp_path / method, opts)
    a = load_artifact(path)
    m = a.manifest
    assert m["method"]["registry_name"] == method and m["method"]["name"] == "didi"
    assert m["method"]["hyper_parameters"]["allocation"] == allocation
    assert m["metrics"]["refine"]["optimizer"] == optimizer
    assert 1.0 < a.storage_ratio <= 1.5  # (uniform: one rank on all (T+1)·L modules costs 1.40 here)
    # the ranks in the manifest price the stored factors: Σ r (m + n) over shared and experts
    lora = sum(s.numel for s in a.stored() if s.kind == "lora")
    shapes = {n: t["matrix_shape"] for n, t in m["tensors"].items()}
    assert lora == sum(r * sum(shapes[n]) for n, rs in m["ranks"].items() for r in rs.values())
    # the artifact serves every task (θ0 + shared + expert) in the base's shapes
    sd = a.task_state_dict("task_0")
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_didi_options_parse_budget_presets():
    opts = get_method("didi").make_options({"budget": "M"})
    assert opts.budget == 1.4
    with pytest.raises(Exception, match="budget"):
        get_method("didi").make_options({"budget": 0.9})
