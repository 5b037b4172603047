"""Helpers shared by the backbone-adapter tests (synthetic fine-tunes, an independent τ̃), and registry/CLI tests.

`expected_task_state` recomputes θ0 + τ̃_t straight from the artifact's safetensors (A_s@B_s + A_t@B_t
reshaped, plus the non-matrix deltas), without `Artifact.task_deltas`, so the adapters' round trip is checked
against a second implementation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from didi.backbones import ADAPTERS, Adapter
from didi.cli import main


def lowrank_delta(shape: tuple[int, int], rank: int, scale: float, g: torch.Generator) -> torch.Tensor:
    m, n = shape
    return scale * (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) / math.sqrt(rank * n)


def synthetic_finetunes(adapter: Adapter, base: dict[str, torch.Tensor], T: int = 3, seed: int = 0,
                        scale: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """θ_t = θ0 + shared rank-1 + own rank-2 deltas on decomposed tensors, small dense deltas on other in-scope
    floating tensors; out-of-scope tensors are untouched. Computed in fp32, stored in θ0's dtype."""
    g = torch.Generator().manual_seed(seed)
    shared, own = {}, [dict() for _ in range(T)]
    for k, v in base.items():
        if not adapter.in_scope(k) or not v.dtype.is_floating_point:
            continue
        if adapter.is_decomposed(k, tuple(v.shape), v.dtype):
            ms = adapter.matrix_shape(k, tuple(v.shape))
            shared[k] = lowrank_delta(ms, 1, scale, g).reshape(v.shape)
            for t in range(T):
                own[t][k] = lowrank_delta(ms, 2, scale, g).reshape(v.shape)
        else:
            shared[k] = torch.zeros(v.shape)
            for t in range(T):
                own[t][k] = 0.01 * torch.randn(v.shape, generator=g)
    out = []
    for t in range(T):
        out.append({k: ((v.float() + shared[k] + own[t][k]).to(v.dtype) if k in shared else v.clone())
                    for k, v in base.items()})
    return out


def expected_task_state(artifact: str | Path, task: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 + τ̃_task in fp32, from the raw artifact files (an implementation independent of artifact.py)."""
    root = Path(artifact)
    deltas: dict[str, torch.Tensor] = {}

    def add(name, d):
        d = d.float().reshape(base[name].shape)
        deltas[name] = deltas.get(name, 0) + d

    fold = root / "fold.safetensors"
    if fold.exists():
        for name, d in load_file(str(fold)).items():
            add(name, d)
    shared = load_file(str(root / "shared.safetensors"))
    own = load_file(str(root / "tasks" / f"{task}.safetensors"))
    for terms in (shared, own):
        for name in {k.rsplit("::", 1)[0] for k in terms}:
            if f"{name}::lora_A" in terms:
                add(name, terms[f"{name}::lora_A"].double() @ terms[f"{name}::lora_B"].double())
            if f"{name}::dense" in terms:
                add(name, terms[f"{name}::dense"])
            if f"{name}::mask" in terms:
                add(name, own[f"{name}::scale"].double() * terms[f"{name}::mask"].double()
                    * shared[f"{name}::ref"].double())
    return {k: (v.float() + deltas[k]) if k in deltas else v.float() for k, v in base.items()}


def check_nonmatrix_policy(artifact: str | Path, adapter: Adapter, base: dict, tunes: dict[str, dict]) -> None:
    """`shared`: fold = mean task delta of every non-decomposed in-scope tensor; `per_task`: exact deltas."""
    root = Path(artifact)
    fold = load_file(str(root / "fold.safetensors")) if (root / "fold.safetensors").exists() else {}
    checked = 0
    for k, v in base.items():
        if not adapter.in_scope(k) or not v.dtype.is_floating_point or adapter.is_decomposed(k, tuple(v.shape), v.dtype):
            continue
        deltas = [tunes[t][k].float() - v.float() for t in tunes]
        if not any(bool(d.abs().max() > 0) for d in deltas):
            continue
        checked += 1
        if adapter.policy_of(k) == "shared":
            torch.testing.assert_close(fold[k], torch.stack(deltas).mean(0), rtol=1e-5, atol=1e-6)
        else:
            assert k not in fold
            for t, d in zip(tunes, deltas):
                torch.testing.assert_close(load_file(str(root / "tasks" / f"{t}.safetensors"))[f"{k}::dense"], d)
    assert checked > 0


def test_backbones_command_lists_every_builtin_adapter(capsys):
    assert main(["backbones", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("state_dict", "open_clip", "hf_clip", "hf_llama"):
        assert rows[name]["class"].endswith(ADAPTERS[name].__name__)
    opts = {o["name"]: o for o in rows["hf_llama"]["options"]}
    assert opts["embeddings"]["default"] == "low_rank" and "nonmatrix_policy" in opts
    assert {o["name"] for o in rows["open_clip"]["options"]} >= {"model_name", "model_config", "include"}
    assert main(["backbones"]) == 0
    table = capsys.readouterr().out
    assert "open_clip" in table and "--backbone.fuse_qkv" in table


def test_import_didi_stays_light():
    import subprocess
    import sys

    # registering the built-in adapters imports neither open_clip nor transformers (lightning, imported by the
    # pipeline, may import transformers itself, so only didi.backbones is checked for it)
    code = ("import sys, didi.backbones; print(sorted({'open_clip', 'transformers'} & set(sys.modules)));"
            "import didi.cli; print('open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]
