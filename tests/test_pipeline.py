"""End-to-end behaviour of the pipeline: artifact round trip against an independent dense computation,
refinement monotonicity, factor-store reuse, multi-process equality, logging."""

import json

import pytest
import torch
from safetensors.torch import load_file

import didi.decompose as dec
from didi import load_artifact
from didi.backbones import Adapter, Zoo
from didi.decompose import decompose
from didi.errors import DidiError
from didi.pipeline import MergeOptions, run_merge
from didi.refine import RefineConfig, init_factors, refine_adam, refine_als, task_errors
from didi.synthetic import make_zoo
from didi.trainer import TrainerConfig


def _trunc(M, r):
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _raw(base, tasks):
    b = load_file(base)
    return b, {t: load_file(p) for t, p in tasks.items()}


@pytest.mark.parametrize("policy", ["shared", "per_task"])
def test_artifact_round_trip_equals_dense_truncation(tmp_path, tiny_zoo, fast, policy):
    """task_state_dict(t) = θ0 + trunc_{r_s}(mean τ) + trunc_{r_t}(τ_t − mean τ) + non-matrix deltas, computed
    here from the raw checkpoints with a fresh SVD (refinement off so the factors are the truncated SVDs)."""
    base, tasks = tiny_zoo
    zoo = Zoo(Adapter(nonmatrix_policy=policy), base, tasks)
    target = 1.3 if policy == "shared" else 1.4
    out = run_merge(
        zoo, tmp_path / "art", MergeOptions(target, fast[0], fast[1], RefineConfig(optimizer="none"), fast[3])
    )
    art = load_artifact(out)
    raw_b, raw_t = _raw(base, tasks)
    names = list(tasks)
    for t in names:
        sd = art.task_state_dict(t)
        assert set(sd) == set(raw_b)
        for name, w0 in raw_b.items():
            taus = torch.stack([raw_t[u][name].double() - w0.double() for u in names])
            if name in art.manifest["ranks"]:
                r = art.manifest["ranks"][name]
                Ms = taus.mean(0)
                expect = w0.double() + _trunc(Ms, r["shared"]) + _trunc(taus[names.index(t)] - Ms, r[t])
            elif policy == "shared":
                expect = w0.double() + taus.mean(0)
            else:
                expect = w0.double() + taus[names.index(t)]
            torch.testing.assert_close(sd[name].double(), expect, rtol=1e-4, atol=1e-5, msg=name)
    assert art.manifest["storage"]["ratio"] <= target
    ratio_by_hand = (
        1
        + sum(
            v.numel()
            for f in ["shared.safetensors", *[f"tasks/{t}.safetensors" for t in names]]
            for v in load_file(str(out / f)).values()
        )
        / art.manifest["base_params"]
    )
    assert art.storage_ratio == pytest.approx(ratio_by_hand)
    assert (out / "rank_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_artifact_checksums_are_verified(tmp_path, tiny_zoo, fast):
    zoo = Zoo(Adapter(), *tiny_zoo)
    out = run_merge(zoo, tmp_path / "art", MergeOptions(1.3, *fast))
    f = out / "tasks" / "task_0.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DidiError, match="sha256 does not match"):
        load_artifact(out)


def test_refinement_never_increases_error():
    g = torch.Generator().manual_seed(0)
    T, m, n = 3, 20, 14
    taus = torch.randn(T, m, n, generator=g)
    Ms = taus.mean(0)
    U, S, Vh = torch.linalg.svd(torch.cat([Ms[None], taus - Ms]), full_matrices=False)
    V = Vh.transpose(-2, -1)
    for r_s, r_t in [(3, [2, 0, 4]), (0, [3, 3, 3]), (5, [1, 1, 1])]:
        A_s, B_s = init_factors(U[0], S[0], V[0], r_s)
        pairs = [init_factors(U[t + 1], S[t + 1], V[t + 1], r) for t, r in enumerate(r_t)]
        A_t, B_t = [a for a, _ in pairs], [b for _, b in pairs]
        e0 = task_errors(taus, A_s, B_s, A_t, B_t).sum()
        for fn, kw in ((refine_als, dict(sweeps=3, power_iters=2)), (refine_adam, dict(steps=50, lr=0.01))):
            out = fn(taus, A_s.clone(), B_s.clone(), [a.clone() for a in A_t], [b.clone() for b in B_t], **kw)
            e1 = task_errors(taus, *out).sum()
            assert e1 <= e0 * (1 + 1e-6), (fn.__name__, float(e0), float(e1))
            assert out[0].shape == (m, r_s) and [a.shape[1] for a in out[2]] == r_t
    # ALS reaches the block optimum: the shared part (updated last in a sweep) is the best rank-r_s fit of the
    # mean residual mean_t(τ_t − A_tB_t) (Eckart–Young), so no other rank-3 shared part does better
    A_s, B_s, A_t, B_t = refine_als(
        taus,
        *init_factors(U[0], S[0], V[0], 3),
        [init_factors(U[t + 1], S[t + 1], V[t + 1], 2)[0] for t in range(T)],
        [init_factors(U[t + 1], S[t + 1], V[t + 1], 2)[1] for t in range(T)],
        sweeps=1,
        power_iters=60,
    )
    R = torch.stack([taus[t] - A_t[t] @ B_t[t] for t in range(T)]).double()
    torch.testing.assert_close((A_s @ B_s).double(), _trunc(R.mean(0), 3), rtol=1e-4, atol=1e-4)


def test_als_refinement_lowers_error_in_artifact(tmp_path, tiny_zoo, fast):
    zoo = Zoo(Adapter(), *tiny_zoo)
    out = run_merge(zoo, tmp_path / "art", MergeOptions(1.3, *fast))
    ref = load_artifact(out).manifest["metrics"]["refine"]
    assert ref["rec_err_after"] <= ref["rec_err_before"] + 1e-9
    assert ref["rec_err_after"] < ref["rec_err_before"]  # the shared factors are coupled: ALS must gain


def test_factor_store_is_reused_across_budgets(tmp_path, tiny_zoo, fast, monkeypatch):
    zoo = Zoo(Adapter(), *tiny_zoo)
    run_merge(zoo, tmp_path / "a", MergeOptions(1.3, *fast))
    calls = []
    monkeypatch.setattr(dec, "decompose_batch", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(dec, "svd", lambda *a, **k: calls.append(1))
    run_merge(zoo, tmp_path / "b", MergeOptions(1.1, *fast))
    assert calls == []
    assert decompose(zoo, fast[0]).root == decompose(zoo, fast[0]).root


@pytest.mark.slow
def test_two_process_ddp_reproduces_one_process(tmp_path, tiny_zoo, fast):
    """Search ranks and refined factors under ddp_spawn on 2 CPU processes equal the 1-process run."""
    zoo = Zoo(Adapter(), *tiny_zoo)
    d, s, r, t = fast
    s.layer_batch_size = 3  # several layer batches, uneven shares across the two processes
    r.layer_batch_size = 3
    one = run_merge(zoo, tmp_path / "one", MergeOptions(1.3, d, s, r, t))
    two = run_merge(
        zoo,
        tmp_path / "two",
        MergeOptions(
            1.3,
            d,
            s,
            r,
            TrainerConfig(
                accelerator="cpu", devices=2, strategy="ddp_spawn", logger="none", progress_bar=False
            ),
        ),
    )
    a, b = load_artifact(one), load_artifact(two)
    ca, cb = a.manifest["metrics"]["allocation"], b.manifest["metrics"]["allocation"]
    torch.testing.assert_close(
        torch.tensor(ca["continuous_ranks"]["experts"]),
        torch.tensor(cb["continuous_ranks"]["experts"]),
        rtol=1e-4,
        atol=1e-4,
    )
    assert a.manifest["ranks"] == b.manifest["ranks"]
    for f in ["shared.safetensors", "tasks/task_0.safetensors", "tasks/task_3.safetensors"]:
        x, y = load_file(str(one / f)), load_file(str(two / f))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6)


def test_csv_and_wandb_offline_logging(tmp_path, tiny_zoo, fast, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    zoo = Zoo(Adapter(), *tiny_zoo)
    d, s, r, _ = fast
    run_merge(
        zoo,
        tmp_path / "csv",
        MergeOptions(
            1.3,
            d,
            s,
            r,
            TrainerConfig(
                accelerator="cpu",
                logger="csv",
                log_dir=str(tmp_path / "logs"),
                log_every_n_steps=5,
                progress_bar=False,
            ),
        ),
    )
    metrics = next((tmp_path / "logs" / "search").rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    for key in (
        "search/rec_err",
        "search/ratio",
        "rank/shared/kind=attn.in_proj_weight",
        "rank/expert/layer=1",
    ):
        assert key in header, key
    run_merge(
        zoo,
        tmp_path / "wb",
        MergeOptions(
            1.3,
            d,
            s,
            r,
            TrainerConfig(
                accelerator="cpu", logger="wandb", log_dir=str(tmp_path / "wlogs"), progress_bar=False
            ),
        ),
    )
    runs = list((tmp_path / "wlogs" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert json.loads((tmp_path / "wb" / "manifest.json").read_text())["files"]["rank_heatmap.png"]
    media = list(runs[0].rglob("*.png"))
    assert any("rank_heatmap" in p.name for p in media), media  # the heatmap went to the W&B run


@pytest.mark.parametrize("batch_mb", [0, 1])
def test_batched_decomposition_equals_one_matrix_at_a_time(tmp_path, batch_mb, monkeypatch):
    """Same-shape matrices buffered for one batched SVD give the factors of single-matrix SVDs, and the
    buffer never holds more than the cap across shapes (plus the matrix that crossed it)."""
    import dataclasses

    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=96, layers=3, noise=0.01, seed=1)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    sizes = []
    real = dec.decompose_batch

    def spy(taus, *a, **k):
        sizes.append(taus.numel() * taus.element_size())
        return real(taus, *a, **k)

    monkeypatch.setattr(dec, "decompose_batch", spy)
    cfg = dec.DecomposeConfig(cache_dir=str(tmp_path / "c"), device="cpu", batch_mb=batch_mb)
    store = decompose(zoo, cfg, progress=False)
    biggest = max(e.m * e.n for e in store.matrices) * 3 * 4
    assert max(sizes) <= batch_mb * 2**20 + biggest
    if batch_mb:
        assert len(sizes) < len(store.matrices)  # some calls were batched (width-96 blocks: 110 KB each)
    else:
        assert len(sizes) == len(store.matrices)
    ref = decompose(
        zoo, dataclasses.replace(cfg, batch_mb=None, cache_dir=str(tmp_path / "r")), progress=False
    )
    ref_index = {e.name: e.idx for e in ref.matrices}
    assert sorted(ref_index) == sorted(e.name for e in store.matrices)
    for e in store.matrices:
        a, b = store.load(e.idx), ref.load(ref_index[e.name])
        for k in ("S_s", "S_t", "tau_sq", "inner"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
        # singular vectors up to sign: compare the rank-K reconstructions
        torch.testing.assert_close(
            a["U_s"] * a["S_s"].float() @ a["V_s"].T,
            b["U_s"] * b["S_s"].float() @ b["V_s"].T,
            rtol=1e-4,
            atol=1e-5,
        )


def test_search_width_grows_until_the_budget_is_reachable(tmp_path, monkeypatch):
    """When the greedy ranks stop short (no positive gain left, as with a TSV-M shared part), the search width
    derived from them must still admit the budget: it widens instead of refusing a reachable budget."""
    import didi.allocation as pl
    from didi.search import SearchConfig

    base, tasks = make_zoo(tmp_path / "zoo", T=2, width=96, layers=1, noise=0.01, seed=2)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    store = decompose(zoo, dec.DecomposeConfig(cache_dir=str(tmp_path / "c"), device="cpu"), progress=False)
    L, T = len(store.matrices), len(store.tasks)
    monkeypatch.setattr(
        pl,
        "greedy_ranks",
        lambda *a, **k: (torch.zeros(L, dtype=torch.long), torch.zeros(L, T, dtype=torch.long), 32, 0.0),
    )
    tcfg = TrainerConfig(accelerator="cpu", logger="none", progress_bar=False)
    ranks = pl.allocate(store, 3.5, SearchConfig(steps=5), tcfg, "shared")
    assert ranks.info["search_width"] > 32
    assert 3.5 - 2 * 192 / store.base_params < ranks.info["ratio"] <= 3.5 + 1e-9


def test_terms_cache_batches_cut_from_the_full_stack_equal_computed_ones(tmp_path, tiny_zoo, fast):
    """Layer-batch terms taken from the memoised float64 stack of every matrix equal terms computed from the
    factor store for that batch (same K grouping, same row order, unsorted batches too)."""
    from didi.allocation import TermsCache
    from didi.closed_form import GroupTerms

    zoo = Zoo(Adapter(), *tiny_zoo)
    store = decompose(zoo, fast[0], progress=False)
    L = len(store.matrices)
    widths = [min(e.K, 3 + i % 4) for i, e in enumerate(store.matrices)]  # several search widths
    cut = TermsCache(store, widths)
    cut.groups(list(range(L)), torch.float64)
    for batch in ([0, 1, 2], [5, 3, 1], list(range(L))[::-2]):
        a, b = cut.groups(batch, torch.float32), TermsCache(store, widths).groups(batch, torch.float32)
        assert len(a) == len(b)
        for (ia, ga), (ib, gb) in zip(a, b):
            assert ia.tolist() == ib.tolist()
            for f in GroupTerms.__dataclass_fields__:
                torch.testing.assert_close(getattr(ga, f), getattr(gb, f))
    assert cut.tau_total() == pytest.approx(TermsCache(store, widths).tau_total(), rel=1e-12)


def test_auto_width_widens_until_no_module_sits_at_it(tmp_path, fast, monkeypatch, capsys):
    """`max_rank: auto` is an estimate: when the search gives a module the store's whole width, the store is
    widened and the search run again, and the result is the search at the final width (equal to asking for
    that width explicitly), with no module left at the width."""
    import dataclasses

    import didi.allocation as al
    from didi.pipeline import run_search

    base, tasks = make_zoo(tmp_path / "zoo", T=3, width=96, layers=2, noise=0.05, seed=3)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in tasks.items()})
    monkeypatch.setattr(al, "WIDTH_MARGIN", 0.01)  # the estimate gives 32, far below what 1.6× buys
    assert al.auto_width(zoo, 1.6) == 32
    auto = MergeOptions(1.6, dataclasses.replace(fast[0], max_rank="auto"), *fast[1:])
    ranks, store = run_search(zoo, tmp_path / "auto.json", auto, progress=False)
    err = capsys.readouterr().err
    assert "widening to K = 64" in err
    assert ranks.info["at_width"] == 0
    final = ranks.info["width"]
    assert final in (64, None)
    assert {e.K for e in store.matrices} == ({min(e.m, e.n, final or 10**9) for e in store.matrices})
    explicit = MergeOptions(1.6, dataclasses.replace(fast[0], max_rank=final), *fast[1:])
    ref, _ = run_search(zoo, tmp_path / "explicit.json", explicit, progress=False)
    assert torch.equal(ranks.r_s, ref.r_s) and torch.equal(ranks.r_t, ref.r_t)
