"""Every registered method against an independent literal computation (numpy / hand-worked numbers), its
storage ratio checked by hand, and its artifact rebuilt per task by `Artifact.task_state_dict`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from didi.artifact import load_artifact
from didi.backbones import Adapter, Zoo
from didi.errors import DidiError
from didi.merges import ties_merge, tsv_m_merge
from didi.methods import METHODS, apply_method, get_method, list_methods
from didi.methods.dynamic import emr_unify, tall_masks
from didi.methods.flexmerge import block_of, greedy_clusters
from didi.synthetic import make_zoo


# ------------------------------------------------------------------------------------------------ helpers
def write_zoo(root: Path, base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]]) -> Zoo:
    """A zoo from explicit θ0 and task vectors (task_t = θ0 + τ_t)."""
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.items()}, str(root / "base.safetensors"))
    tasks = {}
    for t, tau in enumerate(taus):
        p = root / f"t{t}.safetensors"
        save_file({k: (v + tau.get(k, torch.zeros_like(v))).contiguous() for k, v in base.items()}, str(p))
        tasks[f"t{t}"] = str(p)
    return Zoo(Adapter(), str(root / "base.safetensors"), tasks)


def synthetic_zoo(tmp_path, T=4, width=8, layers=1) -> tuple[Zoo, dict, dict]:
    """make_zoo's model (matrices, a bias, a norm, a frozen tensor) with θ0 and τ as numpy arrays."""
    from safetensors.numpy import load_file

    base_p, tasks = make_zoo(tmp_path / "zoo", T=T, width=width, layers=layers, noise=0.01)
    zoo = Zoo(Adapter(), str(base_p), {k: str(v) for k, v in tasks.items()})
    base = {k: v.astype(np.float64) for k, v in load_file(str(base_p)).items()}
    taus = {t: {k: load_file(str(p))[k].astype(np.float64) - base[k] for k in base} for t, p in tasks.items()}
    return zoo, base, taus


def rebuilt(path, zoo: Zoo) -> dict[str, dict[str, np.ndarray]]:
    """Per task: Artifact.task_state_dict − θ0 (what the artifact serves), as numpy."""
    a = load_artifact(path)
    base = (
        dict(zoo.base_source.items())
        if hasattr(zoo.base_source, "items")
        else {k: zoo.base_source.get(k) for k in zoo.base_source.keys()}
    )
    out = {}
    for t in a.tasks:
        sd = a.task_state_dict(t, base=base)
        out[t] = {k: sd[k].double().numpy() - base[k].double().numpy() for k in base}
    return out


def np_ties(taus: np.ndarray, k: float, lam: float) -> np.ndarray:
    """Literal TIES with a sort-based threshold (independent of the torch implementation)."""
    T = taus.shape[0]
    flat = taus.reshape(T, -1)
    d = flat.shape[1]
    keep = max(1, int(d * k / 100))
    trimmed = np.zeros_like(flat)
    for t in range(T):
        thr = np.sort(np.abs(flat[t]))[::-1][keep - 1]
        trimmed[t] = np.where(np.abs(flat[t]) >= thr, flat[t], 0.0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    out = np.zeros(d)
    for j in range(d):
        vals = [trimmed[t, j] for t in range(T) if trimmed[t, j] != 0 and np.sign(trimmed[t, j]) == sign[j]]
        out[j] = sum(vals) / len(vals) if vals else 0.0
    return lam * out.reshape(taus.shape[1:])


def np_trunc(M: np.ndarray, r: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


def np_tsv_m(taus: np.ndarray) -> np.ndarray:
    T, m, n = taus.shape
    s = min(m, n) // T
    Us, Ss, Vs = [], [], []
    for t in range(T):
        U, S, Vt = np.linalg.svd(taus[t], full_matrices=False)
        Us.append(U[:, :s]), Ss.append(S[:s]), Vs.append(Vt[:s].T)
    U, S, V = np.concatenate(Us, 1), np.concatenate(Ss), np.concatenate(Vs, 1)

    def polar(X):
        P, _, Qt = np.linalg.svd(X, full_matrices=False)
        return P @ Qt

    return polar(U) @ np.diag(S) @ polar(V).T


MATRIX = lambda name, arr: arr.ndim == 2  # noqa: E731  (make_zoo's adapter decomposes every 2-D tensor)


def literal(
    method: str, taus: dict[str, dict[str, np.ndarray]], tasks: list[str]
) -> dict[str, dict[str, np.ndarray]]:
    """Expected per-task deltas of `method` at defaults (docs/method.md §5), tensor by tensor in numpy."""
    T = len(tasks)
    names = list(taus[tasks[0]])
    out = {t: {} for t in tasks}
    emr_num, emr_den, emr_parts = np.zeros(T), np.zeros(T), {}
    for name in names:
        X = np.stack([taus[t][name] for t in tasks])
        zero = not np.abs(X).max() > 0
        mat = MATRIX(name, X[0])
        for j, t in enumerate(tasks):
            if zero:
                out[t][name] = np.zeros_like(X[0])
                continue
            if method == "averaging":
                out[t][name] = X.mean(0)
            elif method == "task_arithmetic":
                out[t][name] = 0.3 * X.sum(0)
            elif method == "ties":
                out[t][name] = np_ties(X, 20, 0.3)
            elif method == "tsv_m":
                out[t][name] = np_tsv_m(X) if mat else X.mean(0)
            elif method == "tsv_c":
                out[t][name] = np_trunc(X[j], max(1, min(X[j].shape) // T)) if mat else X[j]
            elif method == "tall_masks":
                mtl = X.sum(0)
                out[t][name] = (np.abs(X[j]) > 0.6 * np.abs(mtl - X[j])) * mtl
            elif method == "twin":
                shared = 0.3 * X.sum(0)
                v = X[j] - shared
                out[t][name] = shared + (np_trunc(v, max(1, int(0.1 * min(v.shape)))) if mat else v)
        if method == "emr" and not zero:
            sign = np.sign(X.sum(0))
            uni = sign * np.max(np.where(X * sign > 0, np.abs(X), 0.0), axis=0)
            masks = X * uni > 0
            emr_num += np.abs(X).reshape(T, -1).sum(1)
            emr_den += np.abs(masks * uni).reshape(T, -1).sum(1)
            emr_parts[name] = (uni, masks)
        elif method == "emr":
            for t in tasks:
                out[t][name] = np.zeros_like(X[0])
    for name, (uni, masks) in emr_parts.items():
        for j, t in enumerate(tasks):
            out[t][name] = emr_num[j] / emr_den[j] * masks[j] * uni
    return out


STREAMING = [
    n for n in ("averaging", "task_arithmetic", "ties", "tsv_m", "tsv_c", "emr", "tall_masks", "twin")
]


# ------------------------------------------------------------------------------------------ hand-worked cases
def test_ties_hand_worked_3_tasks_4x4():
    """k = 50 % keeps the 8 entries of magnitude ≥ 1 per task; signs are elected on the trimmed sums."""
    t1 = [[2, 2, -3, 0.2], [1, -2, 0.4, 5], [0.7, -1, 3, 0.3], [-0.5, 0.6, 0.1, 0.9]]
    t2 = [[4, -5, 0.1, 0.3], [1, -2, -3, 0.5], [2, 0.8, -0.2, 0.4], [3, 0.2, -1, 0.6]]
    t3 = [[3, 1, 2, 0.1], [-0.7, 0.2, -1, 0.6], [-4, 0.9, -1, 2], [0.2, -2, 0.3, 0.4]]
    taus = torch.tensor([t1, t2, t3], dtype=torch.float64)
    # position by position (trimmed values; elected sign; mean of the agreeing entries):
    #  (0,0) 2,4,3 → + → 3            (0,1) 2,-5,1 → sum −2 → − → −5
    #  (0,2) −3,·,2 → − → −3          (0,3) all trimmed → 0
    #  (1,0) 1,1,· → + → 1            (1,1) −2,−2,· → −2
    #  (1,2) ·,−3,−1 → −2             (1,3) 5,·,· → 5
    #  (2,0) ·,2,−4 → − → −4          (2,1) −1,·,· → −1 (raw sum +0.7: signs are elected after trimming)
    #  (2,2) 3,·,−1 → + → 3           (2,3) ·,·,2 → 2
    #  (3,0) ·,3,· → 3                (3,1) ·,·,−2 → −2
    #  (3,2) ·,−1,· → −1              (3,3) all trimmed → 0
    expected = torch.tensor(
        [[3, -5, -3, 0], [1, -2, -2, 5], [-4, -1, 3, 2], [3, -2, -1, 0]], dtype=torch.float64
    )
    assert torch.equal(ties_merge(taus, k=50, lam=1.0), expected)
    assert torch.allclose(ties_merge(taus, k=50, lam=0.4), 0.4 * expected)
    assert np.allclose(np_ties(taus.numpy(), 50, 1.0), expected.numpy())  # the literal reference agrees
    # k = 100: nothing trimmed; (0,1): 2 − 5 + 1 < 0 → −5
    assert ties_merge(taus, k=100, lam=1.0)[0, 1] == -5


def test_ties_matches_literal_on_random():
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(4, 7, 9, generator=g, dtype=torch.float64)
    for k in (5, 20, 63, 100):
        assert np.allclose(ties_merge(taus, k, 0.7).numpy(), np_ties(taus.numpy(), k, 0.7))


def test_emr_hand_worked(tmp_path):
    taus = torch.tensor([[1.0, -2, 3, 0], [2, 1, -1, 0], [-1, -4, 2, 0]])
    uni, masks = emr_unify(taus)
    assert torch.equal(uni, torch.tensor([2.0, -4, 3, 0]))  # sign(Σ) = (+,−,+,0); max |τ| of the agreeing
    assert torch.equal(masks, torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool))
    # rescalers Σ|τ_t| / Σ|mask_t ⊙ τ_uni| = 6/9, 4/2, 7/7; through the method and the artifact:
    zoo = write_zoo(tmp_path / "zoo", {"w": torch.zeros(4)}, [{"w": x} for x in taus])
    art = apply_method("emr", zoo, tmp_path / "emr")
    got = rebuilt(art, zoo)
    assert np.allclose(got["t0"]["w"], 6 / 9 * np.array([2, -4, 3, 0]))
    assert np.allclose(got["t1"]["w"], [4, 0, 0, 0])
    assert np.allclose(got["t2"]["w"], [0, -4, 3, 0])
    m = load_artifact(art).manifest["metrics"]
    assert m["rescalers"] == pytest.approx({"t0": 6 / 9, "t1": 2.0, "t2": 1.0})


def test_emr_rescaler_spans_the_whole_model(tmp_path):
    """One rescaler per task over every tensor (EMR's definition), not one per tensor."""
    a = torch.tensor([[1.0, -2], [2, 1], [-1, -4]])
    b = torch.tensor([[3.0], [-1], [1]])
    zoo = write_zoo(
        tmp_path / "zoo",
        {"a": torch.zeros(2), "b": torch.zeros(1)},
        [{"a": a[t], "b": b[t]} for t in range(3)],
    )
    got = rebuilt(apply_method("emr", zoo, tmp_path / "emr"), zoo)
    exp = literal(
        "emr",
        {f"t{t}": {"a": a[t].double().numpy(), "b": b[t].double().numpy()} for t in range(3)},
        ["t0", "t1", "t2"],
    )
    # hand: uni a = (2, −4), b = 3; masks t0 (1,1 | 1); Σ|τ_0| = 6, Σ|m⊙uni| = 9 → 2/3
    assert np.allclose(exp["t0"]["a"], [4 / 3, -8 / 3]) and np.allclose(exp["t0"]["b"], [2.0])
    for t in exp:
        for k in exp[t]:
            assert np.allclose(got[t][k], exp[t][k], atol=1e-6)


def test_tall_masks_hand_worked(tmp_path):
    taus = torch.tensor([[1.0, 0.1, -2], [1, -1, 2]])
    mtl = taus.sum(0)  # (2, −0.9, 0)
    masks = tall_masks(taus, mtl, 0.6)
    # t0: 1 > 0.6·1 ✓, 0.1 > 0.6·1 ✗, 2 > 0.6·2 ✓ ;  t1: 1 > 0.6 ✓, 1 > 0.06 ✓, 2 > 1.2 ✓
    assert torch.equal(masks, torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool))
    # the known trap (arguments swapped: |τ_MTL − τ_t| > λ|τ_t|) gives other masks
    assert not torch.equal(masks, (mtl - taus).abs() > 0.6 * taus.abs())
    zoo = write_zoo(tmp_path / "zoo", {"w": torch.ones(3)}, [{"w": x} for x in taus])
    got = rebuilt(apply_method("tall_masks", zoo, tmp_path / "tall"), zoo)
    assert np.allclose(got["t0"]["w"], [2, 0, 0]) and np.allclose(got["t1"]["w"], [2, -0.9, 0])


def test_tall_masks_are_selective_on_a_zoo(tmp_path):
    """Correct masks keep a minority of entries on make_zoo's model; the swapped order keeps ~all of them."""
    zoo, base, taus = synthetic_zoo(tmp_path, T=4, width=16)
    dens = load_artifact(apply_method("tall_masks", zoo, tmp_path / "tall")).manifest["metrics"][
        "mask_density"
    ]
    assert all(0.05 < d < 0.7 for d in dens.values()), dens
    X = np.stack([taus[t]["blocks.0.mlp.c_fc.weight"] for t in taus])
    swapped = (np.abs(X.sum(0) - X) > 0.6 * np.abs(X)).mean()
    assert swapped > 0.8 and max(dens.values()) < 0.5


def test_tsv_m_orthogonalisation():
    g = torch.Generator().manual_seed(2)
    taus = torch.randn(3, 9, 7, generator=g, dtype=torch.float64)
    assert np.allclose(tsv_m_merge(taus).numpy(), np_tsv_m(taus.numpy()))
    # tasks living in mutually orthogonal singular subspaces: the concatenated bases are already orthonormal,
    # so TSV-M is the plain sum of the rank-⌊k/T⌋ task vectors
    Q = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))[0]
    P = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    T = 3  # k = 6, ⌊6/3⌋ = 2 triplets per task
    taus = torch.stack(
        [
            (Q[:, 2 * t : 2 * t + 2] * torch.tensor([3.0 - t, 1.0])) @ P[:, 2 * t : 2 * t + 2].T
            for t in range(T)
        ]
    )
    assert torch.allclose(tsv_m_merge(taus), taus.sum(0), atol=1e-10)
    # overlapping subspaces: the result is U_o diag(σ) V_oᵀ with orthonormal U_o, V_o, so its singular
    # values are the σ's
    taus = torch.randn(2, 8, 6, generator=g, dtype=torch.float64)
    sig = torch.cat([torch.linalg.svdvals(x)[:3] for x in taus]).sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(tsv_m_merge(taus)), sig, atol=1e-10)


# ------------------------------------------------------------------------------------------------- FlexMerge
def _flex_blocks():
    """3 blocks (numel 10, 20, 30) × 4 tasks; the leading entries hold the vectors whose cosines matter."""
    r = math.sqrt
    A = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.95, r(1 - 0.95**2)]]  # cos01 = 1, cos23 = .95, cross 0
    B = [[1, 0, 0], [0.9, r(0.19), 0], [0, 0, 1], [0, r(0.51), 0.7]]  # cos01 = .9, cos23 = .7, cos13 ≈ .31
    C = [[1, 0], [0, 1], [-1, 0], [0.8, 0.6]]  # cos03 = .8, cos13 = .6, cos02 = −1, cos23 = −.8
    out = {}
    for key, vecs, numel in (
        ("blocks.0.attn.w", A, 10),
        ("blocks.0.mlp.w", B, 20),
        ("blocks.0.ln_1.weight", C, 30),
    ):
        X = torch.zeros(4, numel, dtype=torch.float64)
        X[:, : len(vecs[0])] = torch.tensor(vecs, dtype=torch.float64)
        out[key] = X
    return out


def test_flexmerge_cluster_sequence():
    blocks = _flex_blocks()
    grams = {k.split(".")[2]: X @ X.T for k, X in blocks.items()}
    numels = {k.split(".")[2]: X.shape[1] for k, X in blocks.items()}
    clusters, steps, size = greedy_clusters(grams, numels, 60, target=2.5)
    # start 1 + 3·60/60 = 4; merges (by hand): A{0,1} (cos 1) → 3.833; A{2,3} (.95) → 3.667;
    # B{0,1} (.9) → 3.333;
    # C{0,3} (.8) → 2.833; B{2,3} (.7) → 2.5 = target
    seq = [(s.block, s.a, s.b) for s in steps]
    assert seq == [
        ("attn", [0], [1]),
        ("attn", [2], [3]),
        ("mlp", [0], [1]),
        ("ln_1", [0], [3]),
        ("mlp", [2], [3]),
    ]
    assert [round(s.similarity, 6) for s in steps] == [1.0, 0.95, 0.9, 0.8, 0.7]
    assert size == pytest.approx(2.5)
    assert clusters == {"attn": [[0, 1], [2, 3]], "mlp": [[0, 1], [2, 3]], "ln_1": [[0, 3], [1], [2]]}
    # one more step (target 2.4): every remaining pair has minimum similarity ≤ 0; ties (0) go to the first
    # block
    clusters, steps, size = greedy_clusters(grams, numels, 60, target=2.4)
    assert (steps[-1].block, steps[-1].similarity) == ("attn", 0.0) and size == pytest.approx(2 + 1 / 3)
    # min linkage: C's {0,3} vs {1} is min(cos01 = 0, cos13 = .6) = 0, not .6
    _, steps_max, _ = greedy_clusters(grams, numels, 60, target=2.4, linkage="max")
    assert steps_max[5].similarity == pytest.approx(0.6)


def test_flexmerge_end_to_end(tmp_path):
    blocks = _flex_blocks()
    base = {k: torch.randn(X.shape[1], dtype=torch.float64).float() for k, X in blocks.items()}
    taus = [{k: X[t].float() for k, X in blocks.items()} for t in range(4)]
    zoo = write_zoo(tmp_path / "zoo", base, taus)
    assert {block_of(zoo.adapter, k) for k in blocks} == {"0.attn", "0.mlp", "0.ln_1"}
    art = apply_method("flexmerge", zoo, tmp_path / "flex", {"target": 2.5})
    a = load_artifact(art)
    assert a.storage_ratio == pytest.approx(2.5)  # 1 + Σ (clusters − 1)·numel / 60 = 1 + (10+20+60)/60
    assert a.manifest["metrics"]["flexmerge"]["reached_size"] == pytest.approx(2.5)
    # per block the first largest cluster is folded into the base ({0,1}, {0,1}, {0,3}); {2,3} is stored
    # once as a group (attn + mlp tensors), the ln_1 singletons {1}, {2} in their task files
    assert a.manifest["groups"] == {"g0": ["t2", "t3"]}
    by_module = a.manifest["storage"]["by_module"]
    assert by_module["group:g0"] == 30 and by_module["t1"] == 30 and by_module["t2"] == 30
    clusters = {
        "blocks.0.attn.w": [[0, 1], [2, 3]],
        "blocks.0.mlp.w": [[0, 1], [2, 3]],
        "blocks.0.ln_1.weight": [[0, 3], [1], [2]],
    }
    got = rebuilt(art, zoo)
    for name, cs in clusters.items():
        for c in cs:
            X = np.stack([blocks[name][i].numpy() for i in c])
            exp = X[0] if len(c) == 1 else 0.3 * X.sum(0)  # TA merger, singletons exact
            for i in c:
                assert np.allclose(got[f"t{i}"][name], exp, atol=1e-6), (name, i)
    # other mergers: averaging
    got = rebuilt(
        apply_method("flexmerge", zoo, tmp_path / "flex_avg", {"target": 2.5, "merger": "average"}), zoo
    )
    assert np.allclose(
        got["t2"]["blocks.0.attn.w"], blocks["blocks.0.attn.w"][2:4].mean(0).numpy(), atol=1e-6
    )
    # the extremes: T× keeps every fine-tune, 1× is one merged model
    got = rebuilt(apply_method("flexmerge", zoo, tmp_path / "flex_T", {"target": 4}), zoo)
    assert all(
        np.allclose(got[f"t{i}"][k], blocks[k][i].numpy(), atol=1e-6) for i in range(4) for k in blocks
    )
    a1 = load_artifact(apply_method("flexmerge", zoo, tmp_path / "flex_1", {"target": 1}))
    assert a1.storage_ratio == 1.0


# ------------------------------------------------------------------------- every method on a real-ish model
@pytest.mark.parametrize("method", STREAMING)
def test_method_matches_literal_on_model_with_biases_norms_frozen(tmp_path, method):
    zoo, base, taus = synthetic_zoo(tmp_path, T=4, width=8)
    tasks = zoo.task_names
    art = apply_method(method, zoo, tmp_path / method)
    got = rebuilt(art, zoo)
    exp = literal(method, taus, tasks)
    for t in tasks:
        assert np.array_equal(got[t]["frozen.weight"], np.zeros((8, 4)))  # frozen stays exactly θ0
        for name in base:
            assert np.allclose(got[t][name], exp[t][name], atol=2e-5), (method, t, name)


def test_storage_ratios_by_hand(tmp_path):
    """make_zoo(T=4, width 8, 1 layer): in_proj 24×8, out_proj 8×8, c_fc 32×8, c_proj 8×32, ln_1 (8),
    bias (24), frozen 8×4 (zero delta). |θ0| = 192 + 64 + 256 + 256 + 8 + 24 + 32 = 832; 800 entries
    change."""
    zoo, _, _ = synthetic_zoo(tmp_path, T=4, width=8)
    assert zoo.base_params == 832
    expected = {
        "averaging": 1.0,
        "task_arithmetic": 1.0,
        "ties": 1.0,
        "tsv_m": 1.0,
        # rank ⌊8/4⌋ = 2 per task: 2·(32 + 16 + 40 + 40) = 256, + bias and norm 32, × 4 tasks
        "tsv_c": 1 + 4 * (256 + 32) / 832,
        # τ_uni 800 dense + 4 masks × 800/32 + 6 tensors × 4 scalars
        "emr": 1 + (800 + 4 * 800 / 32 + 24) / 832,
        "tall_masks": 1 + (800 + 4 * 800 / 32 + 24) / 832,
        # rank max(1, ⌊0.1·8⌋) = 1 per task: 32 + 16 + 40 + 40 = 128, + 32 dense, × 4; the TA merge is folded
        "twin": 1 + 4 * (128 + 32) / 832,
    }
    for method, ratio in expected.items():
        a = load_artifact(apply_method(method, zoo, tmp_path / method))
        assert a.storage_ratio == pytest.approx(ratio), method
        assert a.manifest["storage"]["ratio"] == pytest.approx(ratio)
    # FlexMerge: 6 blocks (4 matrices' modules share blocks: attn = in_proj + out_proj + bias, mlp, ln_1)
    # T× = 1 + 3·800/832 (the frozen tensor is never stored); 1× = 1
    a = load_artifact(apply_method("flexmerge", zoo, tmp_path / "flexT", {"target": 4}))
    assert a.storage_ratio == pytest.approx(1 + 3 * 800 / 832)
    a = load_artifact(apply_method("flexmerge", zoo, tmp_path / "flex2", {"target": 2}))
    assert a.storage_ratio <= 2.0 and a.storage_ratio == pytest.approx(
        a.manifest["metrics"]["flexmerge"]["reached_size"]
    )


def test_artifacts_are_self_describing(tmp_path):
    zoo, _, _ = synthetic_zoo(tmp_path, T=3, width=8)
    a = load_artifact(apply_method("tsv_c", zoo, tmp_path / "c"))
    m = a.manifest
    for key in (
        "method",
        "adapter",
        "sources",
        "tasks",
        "base_params",
        "tensors",
        "ranks",
        "storage",
        "metrics",
    ):
        assert key in m
    assert m["method"] == {"name": "tsv_c", "hyper_parameters": {}}
    assert m["ranks"]["blocks.0.mlp.c_fc.weight"] == {"shared": 0, "task_0": 2, "task_1": 2, "task_2": 2}
    assert set(m["sources"]["base"]["sha256"]) == set(m["tensors"])
    lora = sum(s.numel for s in a.stored() if s.kind == "lora")
    assert lora == sum(3 * r["task_0"] * sum(m["tensors"][n]["matrix_shape"]) for n, r in m["ranks"].items())


# ------------------------------------------------------------------------------------------- registry & CLI
def test_registry_lists_every_method_with_options():
    names = {r["name"] for r in list_methods()}
    assert {
        "averaging",
        "task_arithmetic",
        "ties",
        "tsv_m",
        "tsv_c",
        "emr",
        "tall_masks",
        "twin",
        "flexmerge",
        "didi",
        "didi_uniform",
        "didi_greedy",
        "didi_norefine",
        "didi_folded",
    } <= names
    ties = next(r for r in list_methods() if r["name"] == "ties")
    assert [(o["name"], o["default"]) for o in ties["options"]] == [("k", 20.0), ("lam", 0.3)]
    assert "percentage" in ties["options"][0]["help"]
    assert get_method("tall_masks").make_options().lam == 0.6


@pytest.mark.parametrize(
    "method,opts,msg",
    [
        ("ties", {"k": 0}, "0 < k ≤ 100"),
        ("ties", {"k": 100.5}, "0 < k ≤ 100"),
        ("ties", {"lam": -0.1}, "≥ 0"),
        ("task_arithmetic", {"lam": -1}, "≥ 0"),
        ("tall_masks", {"lam": -0.5}, "≥ 0"),
        ("flexmerge", {"target": 0.9}, "below 1×"),
        ("flexmerge", {"k": 0}, "0 < k"),
        ("twin", {"rank_fraction": 0}, "rank_fraction"),
        ("ties", {"kk": 3}, "unknown option 'kk'"),
        ("nonexistent", None, "unknown merging method"),
    ],
)
def test_invalid_options(method, opts, msg):
    with pytest.raises(DidiError, match=msg):
        get_method(method).make_options(opts)


def test_flexmerge_target_above_T(tmp_path):
    zoo, _, _ = synthetic_zoo(tmp_path, T=3, width=8)
    with pytest.raises(DidiError, match="cannot exceed T× = 3"):
        apply_method("flexmerge", zoo, tmp_path / "f", {"target": 3.5})
    assert not (tmp_path / "f").exists()


def test_cli_methods_and_apply(tmp_path, capsys):
    from didi.cli import main

    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(METHODS)
    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=8, layers=1)
    spec = "[" + ", ".join(str(p) for p in tasks.values()) + "]"
    assert (
        main(["apply", "ties", str(base), spec, str(tmp_path / "out"), "--options", "{k: 30, lam: 0.5}"]) == 0
    )
    a = load_artifact(tmp_path / "out")
    assert a.manifest["method"] == {"name": "ties", "hyper_parameters": {"k": 30, "lam": 0.5}}
    assert main(["apply", "ties", str(base), spec, str(tmp_path / "bad"), "--options", "{k: 130}"]) == 2
    assert "0 < k ≤ 100, found 130" in capsys.readouterr().err


def test_static_merges_serve_as_didi_shared_part(tmp_path):
    """`--decompose.shared_merge ties|tsv_m`: M_s is the registry's merge (checked from the factor store) and
    shared + experts still reconstruct τ_t exactly (M_t = τ_t − M_s). The kernels live in `didi.merges`, which
    `decompose` imports itself: nothing has to be registered by importing the method registry first."""
    from didi.decompose import DecomposeConfig, decompose
    from didi.merges import SHARED_MERGES

    assert {"mean", "ties", "tsv_m"} <= set(SHARED_MERGES.names())
    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=8, layers=1, with_vectors=False)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    for merge in ("ties", "tsv_m"):
        store = decompose(
            zoo,
            DecomposeConfig(shared_merge=merge, cache_dir=str(tmp_path / "cache"), device="cpu"),
            progress=False,
        )
        for e in store.matrices:
            f = store.load(e.idx)
            b, xs = zoo.read(e.name)
            taus = torch.stack([x - b for x in xs]).reshape(len(xs), e.m, e.n)
            Ms = (f["U_s"] * f["S_s"].float()) @ f["V_s"].T
            want = ties_merge(taus, 20, 1.0) if merge == "ties" else tsv_m_merge(taus)
            assert torch.allclose(Ms, want, atol=1e-4), (merge, e.name)
            Mt = torch.einsum("tmk,tk,tnk->tmn", f["U_t"], f["S_t"].float(), f["V_t"])
            assert torch.allclose(Ms + Mt, taus, atol=1e-4)
    with pytest.raises(DidiError, match="unknown static merge 'nope'"):
        decompose(
            zoo, DecomposeConfig(shared_merge="nope", cache_dir=str(tmp_path / "cache")), progress=False
        )


def test_published_ratios_and_reasons(tmp_path):
    from didi.methods.published import PUBLISHED, artifact_ratio_row, compare_ratio

    assert PUBLISHED["EMR-Merging"] == 4.0 and PUBLISHED["TSV-C"] == 2.08
    assert compare_ratio("didi", {"budget": 1.4})["published"] == 1.4
    assert compare_ratio("didi", {"budget": 1.3})["published"] is None
    assert compare_ratio("flexmerge", {"target": 2.0})["published"] == 2.0
    assert all(compare_ratio(m)["reason"] for m in METHODS)
    # the EMR reason's arithmetic: at T = 8 with every tensor changed, ours is 2 + 8/32 (+ a scalar per tensor
    # and task), the published 4 is what 1-byte masks would give
    base, tasks = make_zoo(tmp_path / "zoo", T=8, width=8, layers=1, with_vectors=False)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    a = load_artifact(apply_method("emr", zoo, tmp_path / "emr"))
    assert a.storage_ratio == pytest.approx(2.25 + 8 * 4 / zoo.base_params)
    row = artifact_ratio_row(a.manifest)
    assert row["method"] == "emr" and row["published"] == 4.0 and row["ours"] == a.storage_ratio


def test_tall_masks_with_ties_multitask_vector(tmp_path):
    """TALL-Mask+TIES: τ_MTL is the TIES merge (here k = 20 %, λ = 1) and the masks are taken against it."""
    zoo, base, taus = synthetic_zoo(tmp_path, T=3, width=8)
    art = apply_method("tall_masks", zoo, tmp_path / "tt", {"mtl": "ties", "lam": 0.4})
    got = rebuilt(art, zoo)
    for name in base:
        X = np.stack([taus[t][name] for t in taus])
        mtl = np_ties(X, 20, 1.0) if np.abs(X).max() > 0 else np.zeros_like(X[0])
        for j, t in enumerate(taus):
            assert np.allclose(got[t][name], (np.abs(X[j]) > 0.4 * np.abs(mtl - X[j])) * mtl, atol=1e-6)
