"""A whole merge with row-streamed matrices (decomposition and refinement) against the in-memory merge."""

from __future__ import annotations

import json

import torch

import didi.decompose as dec
import didi.refine as ref
import didi.streamed as streamed
from didi.artifact import Artifact
from didi.backbones import Adapter, Zoo
from didi.decompose import DecomposeConfig
from didi.pipeline import MergeOptions, run_merge
from helpers import write_finetune_zoo


def _merge(zoo, tmp_path, fast, stream_mb, name):
    dcfg = DecomposeConfig(
        cache_dir=str(tmp_path / f"cache-{name}"),
        device="cpu",
        max_rank=8,
        svd="randomized",
        oversample=4,
        stream_mb=stream_mb,
    )
    opts = MergeOptions(1.3, dcfg, fast[1], fast[2], fast[3], allocation="greedy")
    return run_merge(zoo, tmp_path / name, opts, progress=False)


def test_streamed_merge_equals_the_in_memory_merge(tmp_path, fast, monkeypatch):
    """A 3000×40 matrix whose T+1 copies pass stream_mb = 1 MB is decomposed and refined from row blocks: the
    artifact's factors and errors equal the in-memory merge's up to float summation order."""
    base, tasks = write_finetune_zoo(tmp_path / "zoo", {"tall.weight": (3000, 40), "sq.weight": (40, 40)})
    zoo = Zoo(Adapter(), base, tasks)
    calls = {"decompose": 0, "refine": 0}
    real_d, real_r = dec.decompose_streamed_part, ref.refine_als_streamed

    def spy_d(*a, **k):
        calls["decompose"] += 1
        return real_d(*a, **k)

    def spy_r(*a, **k):
        calls["refine"] += 1
        return real_r(*a, **k)

    monkeypatch.setattr(dec, "decompose_streamed_part", spy_d)
    monkeypatch.setattr(ref, "refine_als_streamed", spy_r)
    streamed = _merge(zoo, tmp_path, fast, 1, "streamed")
    assert calls == {"decompose": 1, "refine": 1}  # the tall matrix only (the 40×40 one stays in memory)
    in_memory = _merge(zoo, tmp_path, fast, None, "memory")
    assert calls == {"decompose": 1, "refine": 1}
    m_s = json.loads((streamed / "manifest.json").read_text())
    m_m = json.loads((in_memory / "manifest.json").read_text())
    assert m_s["ranks"] == m_m["ranks"]
    for key in ("rec_err_before", "rec_err_after"):
        a, b = m_s["metrics"]["refine"][key], m_m["metrics"]["refine"][key]
        assert abs(a - b) <= 1e-4 * b, key
    ts, tm = _deltas(streamed, "task0"), _deltas(in_memory, "task0")
    for name in ("tall.weight", "sq.weight"):
        assert torch.allclose(ts[name], tm[name], rtol=0, atol=1e-4 * float(tm[name].abs().max())), name


def _deltas(path, task):
    return {n: d.float() for n, d in Artifact(path).task_deltas(task).items()}


def test_rows_kept_on_the_device_give_the_same_artifact(tmp_path, fast, monkeypatch):
    """The GPU's choice to keep a streamed matrix's rows after the first pass (`keeps_rows`, forced here on
    the CPU), taken by both stages of a whole merge, writes the same artifact tensors, byte for byte."""
    base, tasks = write_finetune_zoo(tmp_path / "zoo", {"tall.weight": (3000, 40), "sq.weight": (40, 40)})
    zoo = Zoo(Adapter(), base, tasks)
    read = _merge(zoo, tmp_path, fast, 1, "read")
    asked: list[int] = []

    def keep(device, nbytes):
        asked.append(nbytes)
        return True

    monkeypatch.setattr(streamed, "keeps_rows", keep)
    kept = _merge(zoo, tmp_path, fast, 1, "kept")
    T, m, n = len(tasks), 3000, 40
    assert asked == [(T + 1) * m * n * 4, T * m * n * 4]  # the decomposition's T+1 copies, the refinement's T
    files = sorted(p.relative_to(read) for p in read.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(kept) for p in kept.rglob("*.safetensors"))
    for f in files:
        assert (read / f).read_bytes() == (kept / f).read_bytes(), f
