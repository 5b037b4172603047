"""Calibrated decomposition (`--calibration`, docs/method.md §8): the whitened problem against independent
minimisers of the output error, the closed form against the materialised whitened loss, the hooks' second
moments against a dense computation on a tiny BERT, the artifact's factors mapped back, bad input, and the
data-free default left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from didi.artifact import load_artifact
from didi.backbones import build_adapter
from didi.backbones.base import Zoo
from didi.calibration import (
    WhitenedZoo,
    cholesky_factor,
    second_moments,
    targets,
    uncolor,
    whiteners,
)
from didi.closed_form import hard_error
from didi.decompose import DecomposeConfig, decompose_matrix, terms_from_factors
from didi.errors import DidiError
from didi.merges import mean_merge
from didi.pipeline import MergeOptions, run_merge
from didi.refine import RefineConfig, init_factors
from didi.search import SearchConfig
from didi.trainer import TrainerConfig
from helpers import WORDS, add_vocab, make_bert_zoo

F64 = torch.float64


def _trunc(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _metric(X: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
    """C = chol(XXᵀ/N + ε·d·I) and d, from inputs X [n, N]."""
    S = X @ X.T / X.shape[1]
    return cholesky_factor(S, eps), float(torch.diagonal(S).mean())


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_whitened_truncation_is_the_output_error_minimiser(eps):
    """trunc_r(τC)·C⁻¹ equals the best rank-r M of ‖(M − τ)X‖²/N + ε·d·‖M − τ‖², computed by another route:
    the rank-r truncation of τX̃ mapped back by least squares (X̃ = [X/√N, √(εd)·I], so ‖EX̃‖² is the
    objective), and it beats the data-free truncation in that metric."""
    g = torch.Generator().manual_seed(0)
    m, n, N, r = 7, 5, 40, 2
    tau = torch.randn(m, n, generator=g, dtype=F64)
    X = (
        torch.randn(n, N, generator=g, dtype=F64)
        * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=F64)[:, None]
    )
    C, d = _metric(X, eps)
    ours = uncolor(_trunc(tau @ C, r), C)
    Xt = torch.cat([X / N**0.5, (eps * d) ** 0.5 * torch.eye(n, dtype=F64)], 1)
    brute = _trunc(tau @ Xt, r) @ torch.linalg.pinv(Xt)
    assert torch.linalg.matrix_rank(ours) == r
    torch.testing.assert_close(ours, brute, rtol=1e-9, atol=1e-9)

    def loss(M):
        return float(((M - tau) @ Xt).pow(2).sum())

    assert loss(ours) < loss(_trunc(tau, r)) * 0.99
    # and the identity of docs/method.md §8: ‖EC‖² = ‖EX‖²/N + ε·d·‖E‖²
    E = ours - tau
    torch.testing.assert_close(
        (E @ C).pow(2).sum(), (E @ X).pow(2).sum() / N + eps * d * E.pow(2).sum(), rtol=1e-10, atol=0
    )


def test_unit_scale_changes_the_weight_not_the_shape():
    """`calibration_scale unit`: C/√d, so mean(diag CCᵀ) = 1 + ε for inputs of any scale; per matrix the
    minimiser is the same as with `output` (a constant factor of the metric)."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(5, 30, generator=g, dtype=F64) * 7.0
    S = X @ X.T / 30
    C, d = _metric(X, 0.01)
    U = cholesky_factor(S, 0.01, unit=True)
    torch.testing.assert_close(U, C / d**0.5)
    assert float(torch.diagonal(U @ U.T).mean()) == pytest.approx(1.01, rel=1e-12)
    tau = torch.randn(4, 5, generator=g, dtype=F64)
    torch.testing.assert_close(uncolor(_trunc(tau @ U, 2), U), uncolor(_trunc(tau @ C, 2), C))


def test_gradient_descent_finds_no_better_factor_pair():
    """A factor pair (A, B) trained by gradient descent on the output error ‖(AB − τ)X‖² from the whitened
    solution cannot lower it (it is the minimiser), and from a random start it reaches the same loss."""
    g = torch.Generator().manual_seed(1)
    m, n, N, r = 6, 4, 30, 2
    tau = torch.randn(m, n, generator=g, dtype=F64)
    X = torch.randn(n, N, generator=g, dtype=F64) * torch.tensor([3.0, 1.0, 0.3, 0.1], dtype=F64)[:, None]
    C, _ = _metric(X, 0.0)
    best = float(((uncolor(_trunc(tau @ C, r), C) - tau) @ X).pow(2).sum())
    A = torch.randn(m, r, generator=g, dtype=F64, requires_grad=True)
    B = torch.randn(r, n, generator=g, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([A, B], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        loss = ((A @ B - tau) @ X).pow(2).sum()
        loss.backward()
        opt.step()
    final = float(loss.detach())
    assert final >= best * (1 - 1e-6)
    assert final == pytest.approx(best, rel=1e-3)


def test_closed_form_equals_the_materialised_whitened_loss():
    """The store's closed form (docs/method.md §3) on the whitened task vectors τC, at integer ranks, equals
    Σ_t ‖(M̃_s + M̃_t − τ_t)X‖²/N + ε·d·‖·‖² of the factors mapped back (B ← B C⁻¹), measured on X."""
    g = torch.Generator().manual_seed(2)
    T, m, n, N, eps = 3, 6, 5, 50, 0.05
    taus = torch.randn(T, m, n, generator=g, dtype=F64)
    X = torch.randn(n, N, generator=g, dtype=F64) * torch.linspace(3, 0.2, n, dtype=F64)[:, None]
    C, d = _metric(X, eps)
    f, _, _ = decompose_matrix(taus @ C, mean_merge, 4)  # K = 4 < min(m, n): the truncated case
    terms = terms_from_factors(f, 4, dtype=F64)
    r_s, r_t = 2, [1, 3, 0]
    closed = hard_error(terms, torch.tensor([float(r_s)], dtype=F64), torch.tensor([r_t], dtype=F64))[0]
    A_s, B_s = init_factors(f["U_s"].double(), f["S_s"], f["V_s"].double(), r_s)
    Ms = A_s @ uncolor(B_s, C)
    for t in range(T):
        A, B = init_factors(f["U_t"][t].double(), f["S_t"][t], f["V_t"][t].double(), r_t[t])
        E = Ms + A @ uncolor(B, C) - taus[t]
        literal = (E @ X).pow(2).sum() / N + eps * d * E.pow(2).sum()
        torch.testing.assert_close(closed[t], literal, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------- tiny BERT zoo
def _texts(g: torch.Generator, vocab: list[str], n: int) -> list[dict]:
    """Texts of 2 to 9 words (so batches are padded)."""
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 10, (1,), generator=g))
        out.append({"text": " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (k,), generator=g))})
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A 3-task tiny BERT zoo (width 32, MLP 64), validation.jsonl (unlabelled texts) and test.jsonl per
    task."""
    root = tmp_path_factory.mktemp("calib")
    base, tasks = make_bert_zoo(root / "zoo")
    add_vocab(root / "zoo" / "base" / "0_Transformer")
    g = torch.Generator().manual_seed(3)
    data = {}
    for j, t in enumerate(tasks):
        vocab = WORDS[10 * j : 10 * j + 25]
        d = root / "data" / t
        d.mkdir(parents=True)
        (d / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in _texts(g, vocab, 30)))
        (d / "test.jsonl").write_text(json.dumps({"text": "never read", "label": 0}) + "\n")
        data[t] = str(root / "data" / t)
    zoo = Zoo(build_adapter("hf_encoder"), base, tasks)
    return {"root": root, "zoo": zoo, "data": data, "base": base, "tasks": tasks}


def _dense_layer_inputs(zoo: Zoo, data: dict, examples: int) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Per task, (Σ h hᵀ, rows) of each block's input h over the real tokens, from output_hidden_states (no
    hook): the input of that block's query/key/value."""
    from transformers import AutoTokenizer

    model = zoo.adapter.build_model(dict(zoo.base_source.items())).eval()
    tok = AutoTokenizer.from_pretrained(str(Path(zoo.base) / "0_Transformer"))
    out = {}
    for t in zoo.task_names:
        lines = (Path(data[t]) / "validation.jsonl").read_text().splitlines()[:examples]
        texts = [json.loads(x)["text"] for x in lines]
        enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        assert bool((enc["attention_mask"] == 0).any())  # padding is there, and must not count
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        mask = enc["attention_mask"].bool()
        out[t] = [(h[mask].double().T @ h[mask].double(), int(mask.sum())) for h in hs[:-1]]
    return out


def test_hooks_collect_the_dense_second_moment(bert):
    zoo, data = bert["zoo"], bert["data"]
    mom = second_moments(zoo, data, examples=20, max_length=16, batch_size=7, progress=False)
    model = zoo.adapter.build_model(dict(zoo.base_source.items()))
    assert set(mom.targets) == set(targets(zoo, model)) == {p.name for p in zoo.matrices}
    assert not mom.skipped and mom.examples == [20, 20, 20]
    dense = _dense_layer_inputs(zoo, data, 20)
    for layer in range(2):
        for proj in ("query", "key", "value"):
            name = f"encoder.layer.{layer}.attention.self.{proj}.weight"
            for j, t in enumerate(zoo.task_names):
                S, rows = dense[t][layer]
                assert mom.rows[name][j] == rows
                torch.testing.assert_close(mom.sums[name][j].double(), S, rtol=1e-5, atol=1e-4)
    # the MLP output's input is 64 wide and seen on the same tokens
    name = "encoder.layer.0.output.dense.weight"
    assert mom.sums[name][0].shape == (64, 64) and mom.rows[name][0] == dense[zoo.task_names[0]][0][1]


def _opts(tmp: Path, **kw) -> MergeOptions:
    base = dict(
        budget=1.3,
        decompose=DecomposeConfig(cache_dir=str(tmp / "cache"), device="cpu"),
        search=SearchConfig(steps=10),
        refine=RefineConfig(sweeps=2, power_iters=2),
        trainer=TrainerConfig(accelerator="cpu", logger="none", progress_bar=False),
    )
    base.update(kw)
    return MergeOptions(**base)


def _whitened_error(art, zoo: Zoo, W: dict, per_task: bool) -> float:
    """Σ_t Σ_l ‖(D_t,l − τ_t,l)C‖² / Σ‖τC‖² from the artifact's deltas D (or, per task, the experts'
    errors against τ_t − M_s in C_t, relative to ‖(τ_t − M_s)C_t‖²)."""
    num = den = 0.0
    deltas = {t: art.task_deltas(t) for t in zoo.task_names}
    for p in zoo.matrices:
        base, xs = zoo.read(p.name, F64)
        taus = torch.stack(xs) - base
        Ms = taus.mean(0)
        for j, t in enumerate(zoo.task_names):
            C = W[p.name][j] if per_task else W[p.name]
            D = deltas[t][p.name].double() if p.name in deltas[t] else torch.zeros_like(Ms)  # rank 0
            target = taus[j] - Ms if per_task else taus[j]
            got = D - Ms if per_task else D
            num += float(((got - target) @ C).pow(2).sum())
            den += float((target @ C).pow(2).sum())
    return num / den


@pytest.mark.parametrize("shared", ["low_rank", "folded"])
def test_pooled_merge_maps_the_factors_back(bert, tmp_path, shared):
    """A pooled calibrated merge: the artifact (factors mapped back) has the whitened error the refinement
    reported, the data-free merge's storage, the checkpoints' own sha256, and (folded, where the allocation is
    exact) a lower output error (whitened) but a higher weight error than the data-free merge at the same
    budget. (With a low-rank shared module the greedy and the search are heuristics in either metric: on this
    planted zoo the data-free ranks happen to be better in the whitened metric too.)"""
    zoo, data = bert["zoo"], bert["data"]
    kw = dict(shared=shared, allocation="greedy")
    cal = run_merge(zoo, tmp_path / "cal", _opts(tmp_path, calibration=data, **kw), progress=False)
    free = run_merge(zoo, tmp_path / "free", _opts(tmp_path, **kw), progress=False)
    a, b = load_artifact(cal), load_artifact(free)
    mom = second_moments(zoo, data, examples=256, max_length=128, progress=False)
    W = whiteners(mom, "pooled", 0.01)
    info = a.manifest["metrics"]["refine"]
    assert info["calibration"]["calibrated"] == len(W) == len(zoo.matrices)
    assert a.manifest["method"]["hyper_parameters"]["calibration"]["mode"] == "pooled"
    assert _whitened_error(a, zoo, W, False) == pytest.approx(info["rec_err_after"], rel=1e-4)
    if shared == "folded":  # the allocation is exact there (§7.1): each merge wins in its own metric
        assert _whitened_error(a, zoo, W, False) < 0.75 * _whitened_error(b, zoo, W, False)
        ones = {k: torch.eye(v.shape[0], dtype=F64) for k, v in W.items()}
        assert _whitened_error(a, zoo, ones, False) > _whitened_error(b, zoo, ones, False)
    assert a.storage_ratio <= 1.3 and a.storage_ratio == pytest.approx(b.storage_ratio, abs=0.02)
    assert a.manifest["sources"] == b.manifest["sources"]  # sha256 of the checkpoints, not of τC
    assert "calibration" not in b.manifest["method"]["hyper_parameters"]


def test_per_task_folded_experts_are_the_whitened_truncations(bert, tmp_path):
    """Per task (folded, shared part fixed): the fold is the mean task vector and each expert is the rank-r_t
    truncation of (τ_t − M_s)C_t mapped back by C_t⁻¹, at the artifact's ranks."""
    zoo, data = bert["zoo"], bert["data"]
    opts = _opts(
        tmp_path,
        calibration=data,
        calibration_mode="per_task",
        shared="folded",
        refine=RefineConfig(optimizer="none"),
    )
    art = load_artifact(run_merge(zoo, tmp_path / "pt", opts, progress=False))
    W = whiteners(second_moments(zoo, data, progress=False), "per_task", 0.01)
    fold = art.fold()
    checked = 0
    for p in zoo.matrices:
        base, xs = zoo.read(p.name, F64)
        taus = torch.stack(xs) - base
        Ms = taus.mean(0)
        torch.testing.assert_close(fold[p.name].double(), Ms, rtol=1e-5, atol=1e-6)
        for j, t in enumerate(zoo.task_names):
            terms = art.task_terms(t)
            key = f"{p.name}::lora_A"
            r = terms[key].shape[1] if key in terms else 0
            got = terms[key].double() @ terms[f"{p.name}::lora_B"].double() if r else torch.zeros_like(Ms)
            want = uncolor(_trunc((taus[j] - Ms) @ W[p.name][j], r), W[p.name][j]) if r else got
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            checked += r > 0
    assert checked > 0
    assert _whitened_error(art, zoo, W, True) == pytest.approx(
        art.manifest["metrics"]["refine"]["rec_err_after"], rel=1e-4
    )


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists() and not (out.parent / f".{out.name}.work").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("index.json"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: {**d, "other": d["task0"]}, r"differ from the zoo's .* not in the zoo: \['other'\]"),
        (lambda d: {k: v for k, v in d.items() if k != "task1"}, r"no data for: \['task1'\]"),
        (lambda d: {}, "no calibration data given"),
    ],
)
def test_bad_calibration_data(bert, tmp_path, change, message):
    out = tmp_path / "out"
    with pytest.raises(DidiError, match=message):
        run_merge(bert["zoo"], out, _opts(tmp_path, calibration=change(bert["data"])), progress=False)
    _nothing_written(tmp_path, out)


def test_empty_task_data_and_test_split_are_refused(bert, tmp_path):
    data = dict(bert["data"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "validation.jsonl").write_text("\n")
    with pytest.raises(DidiError, match="no validation inputs"):
        run_merge(bert["zoo"], tmp_path / "o1", _opts(tmp_path, calibration={**data, "task0": str(empty)}))
    test_file = str(Path(data["task0"]) / "test.jsonl")
    with pytest.raises(DidiError, match="test split"):
        run_merge(bert["zoo"], tmp_path / "o2", _opts(tmp_path, calibration={**data, "task0": test_file}))
    _nothing_written(tmp_path, tmp_path / "o1")


@pytest.mark.parametrize("mode", ["pooled", "per_task"])
def test_too_few_examples_for_the_width_says_how_many(bert, tmp_path, mode):
    """One example of ≤ 11 tokens per task cannot span the MLP output's 64 input directions (pooled: 3 tasks,
    still < 64 rows): refused whatever ε, with the number of examples that would do."""
    kw = dict(shared="folded", refine=RefineConfig(optimizer="none")) if mode == "per_task" else {}
    opts = _opts(tmp_path, calibration=bert["data"], calibration_examples=1, calibration_mode=mode, **kw)
    with pytest.raises(
        DidiError, match=r"input width (32|64)\) saw \d+ input rows .* about \d+ examples per task"
    ):
        run_merge(bert["zoo"], tmp_path / "out", opts, progress=False)
    _nothing_written(tmp_path, tmp_path / "out")


def test_per_task_needs_the_folded_layout_without_shared_refinement(bert, tmp_path):
    for kw in ({}, {"shared": "folded"}):
        with pytest.raises(DidiError, match="per_task: needs --shared folded and --refine.optimizer none"):
            run_merge(
                bert["zoo"],
                tmp_path / "out",
                _opts(tmp_path, calibration=bert["data"], calibration_mode="per_task", **kw),
                progress=False,
            )
    with pytest.raises(DidiError, match="calibration_eps"):
        _opts(tmp_path, calibration=bert["data"], calibration_eps=-1.0).validate()


def test_data_free_default_never_calibrates(bert, tmp_path, monkeypatch):
    """Without --calibration nothing of didi.calibration runs, the zoo is read as it is and the manifest has
    no calibration entry; didi search refuses calibration (only didi merge maps the factors back)."""
    import didi.pipeline as pipeline
    from didi.pipeline import run_search

    def boom(*a, **k):
        raise AssertionError("calibration ran on the data-free path")

    monkeypatch.setattr(pipeline, "whiten_zoo", boom)
    assert "calibration" not in MergeOptions().hyper_parameters()
    art = load_artifact(run_merge(bert["zoo"], tmp_path / "free", _opts(tmp_path), progress=False))
    assert "calibration" not in art.manifest["method"]["hyper_parameters"]
    assert "calibration" not in art.manifest["metrics"]["refine"]
    assert not isinstance(bert["zoo"], WhitenedZoo)
    with pytest.raises(DidiError, match="only `didi merge`"):
        run_search(bert["zoo"], tmp_path / "r.json", _opts(tmp_path, calibration=bert["data"]))


def test_open_clip_self_attention_and_mlp_inputs(tmp_path):
    """open_clip: the in_proj_weight of each block's self-attention is calibrated on the query its
    MultiheadAttention receives (ln_1 of the block's input, every token of every image), equal to a dense
    computation; out_proj, which MultiheadAttention applies functionally, is never called as a module and
    stays data-free; conv kernels are not targets."""
    from PIL import Image

    from didi.backbones.open_clip import OpenClipAdapter
    from helpers import OPEN_CLIP_TINY

    adapter = OpenClipAdapter(model_config=OPEN_CLIP_TINY)
    torch.manual_seed(0)
    base_sd = {k: v.detach().clone() for k, v in adapter.create("cpu").state_dict().items()}
    save_file(base_sd, str(tmp_path / "base.safetensors"))
    g = torch.Generator().manual_seed(1)
    tasks, data = {}, {}
    for j, t in enumerate(("dark", "bright")):
        sd = {
            k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in base_sd.items()
        }
        save_file(sd, str(tmp_path / f"{t}.safetensors"))
        tasks[t] = str(tmp_path / f"{t}.safetensors")
        for i in range(16):
            arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
            (tmp_path / "data" / t / "validation").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "data" / t / "validation" / f"{i}.png")
        data[t] = str(tmp_path / "data" / t)
    zoo = Zoo(adapter, str(tmp_path / "base.safetensors"), tasks)
    mom = second_moments(zoo, data, examples=16, batch_size=5, progress=False)
    in_proj = "visual.transformer.resblocks.1.attn.in_proj_weight"
    out_proj = "visual.transformer.resblocks.1.attn.out_proj.weight"
    assert mom.targets[in_proj].how == "mha" and in_proj in mom.sums
    assert "not called" in mom.skipped.get(out_proj, "")
    assert not any(len(p.shape) == 4 for p in zoo.matrices if p.name in mom.targets)
    # dense: ln_1 of block 1's input, captured by a forward hook on the block itself
    from didi.datamodules.image import open_clip_transform
    from didi.router import validation_inputs

    model = adapter.build_model(dict(zoo.base_source.items()))
    block = model.visual.transformer.resblocks[1]
    seen = []
    h = block.register_forward_pre_hook(lambda m, a: seen.append(m.ln_1(a[0]).detach()))
    transform = open_clip_transform(model)
    for j, t in enumerate(tasks):
        files = validation_inputs(data, list(tasks), "image", "auto", 16)[t][1]
        seen.clear()
        with torch.no_grad():
            model.encode_image(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
        x = seen[0].reshape(-1, seen[0].shape[-1]).double()
        assert mom.rows[in_proj][j] == x.shape[0] == 16 * 5  # 16 images × (class token + 2×2 patches)
        torch.testing.assert_close(mom.sums[in_proj][j].double(), x.T @ x, rtol=1e-5, atol=1e-4)
    h.remove()


def test_cli_merge_with_calibration(bert, tmp_path, capsys):
    """`didi merge --calibration ... --calibration_mode/eps/examples/max_length` reaches the merge, the
    summary says which metric its errors are in, and the manifest records the settings."""
    from didi.cli import main
    from helpers import FAST_MERGE

    data = "{" + ", ".join(f"{t}: {p}" for t, p in bert["data"].items()) + "}"
    tasks = "{" + ", ".join(f"{t}: {p}" for t, p in bert["tasks"].items()) + "}"
    out = tmp_path / "merged"
    argv = ["merge", bert["base"], tasks, str(out), "--backbone", "HFEncoderAdapter", "--budget", "1.3"]
    argv += ["--calibration", data, "--calibration_eps", "0.05", "--calibration_examples", "20"]
    argv += ["--calibration_scale", "unit"]
    argv += ["--calibration_max_length", "16", "--decompose.cache_dir", str(tmp_path / "cache"), *FAST_MERGE]
    assert main(argv) == 0
    assert "whitened metric" in capsys.readouterr().out
    cal = load_artifact(out).manifest["method"]["hyper_parameters"]["calibration"]
    want = {"data": bert["data"], "mode": "pooled", "eps": 0.05, "scale": "unit", "examples": 20}
    assert cal == {**want, "max_length": 16}
