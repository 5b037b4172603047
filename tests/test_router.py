"""The learned router (didi/router.py) and soft routing (didi/routing.py's Mixture).

- The fit: 100 % routing on separable toy features, better than chance (and below 100 %) on overlapping ones.
- Soft routing against an independent dense computation: per example, θ0 + common + Σ_k w_k·delta_k
  materialised from the artifact (`Artifact.common_deltas` / `task_deltas`, not routing.py) and run alone;
  top-1 at weight 1 is the hard path bit for bit; a fallback row is the shared model θ0 + common.
- End to end on a tiny BERT zoo: a router trained on one task's vocabulary per task routes perfectly, and the
  learned-router evaluation then equals the oracle one, on DiDi and on baseline artifacts (TALL-masks, Twin)
  with the same saved router; a router that always falls back scores exactly the shared model.
- Bad inputs: clear DidiErrors naming the option or file, exit status 2 on the CLI, nothing half-written.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from didi.artifact import load_artifact, write_artifact
from didi.backbones import Adapter, Zoo, build_adapter
from didi.datamodules.text import write_jsonl
from didi.errors import DidiError
from didi.evaluate import evaluate_artifact
from didi.evaluators import load_head, mean_pool
from didi.router import (
    LearnedRouter,
    RouterNet,
    RouterOptions,
    choose_threshold,
    confusion_warnings,
    fit_router,
    load_router,
    router_summary,
    save_router,
    train_router,
)
from didi.routing import SHARED, Mixture, RoutedLayerNorm, RoutedModel
from didi.trainer import TrainerConfig
from helpers import make_bert_zoo, make_text_task_zoo, tiny_merge

CPU = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=False)
FAST = RouterOptions(steps=60, lr=0.05)


# ------------------------------------------------------------------------------------------- the fit
def toy_features(T: int, n: int, gap: float, seed: int = 0, d: int = 8) -> dict[str, torch.Tensor]:
    """n Gaussian feature vectors per task around task means `gap` apart (unit noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = gap * torch.eye(T, d)
    return {f"t{j}": centres[j] + torch.randn(n, d, generator=g) for j in range(T)}


@pytest.mark.parametrize("hidden", [0, 16])
def test_router_separates_separable_tasks(hidden):
    fitted = fit_router(toy_features(3, 40, gap=12.0), RouterOptions(hidden=hidden, steps=60, lr=0.05), CPU)
    r = fitted.record
    assert r["train_accuracy"] == 1.0 and r["routing_accuracy"] == 1.0
    assert fitted.threshold == 0.0 and r["fallback"] == 0.0  # nothing to gain from the shared model
    assert all(v["held_out"] == 8 for v in r["tasks"].values())
    assert fitted.net.hidden == hidden


def test_router_beats_chance_on_overlapping_tasks():
    T = 4
    fitted = fit_router(
        toy_features(T, 80, gap=1.5, seed=1), RouterOptions(threshold="none", steps=60, lr=0.05), CPU
    )
    acc = fitted.record["routing_accuracy"]
    assert 1.0 / T + 0.15 < acc < 1.0, acc
    # the shared model worth as much as a right expert: only the surest inputs are routed; worth nothing:
    # every input is
    worth_all = fit_router(
        toy_features(T, 80, 1.5, 1), RouterOptions(fallback_value=1.0, steps=60, lr=0.05), CPU
    )
    assert worth_all.threshold > 0.5 and worth_all.record["fallback"] > 0.5
    worth_none = fit_router(
        toy_features(T, 80, 1.5, 1), RouterOptions(fallback_value=0.0, steps=60, lr=0.05), CPU
    )
    assert worth_none.threshold == 0.0 and worth_none.record["fallback"] == 0.0


def test_threshold_maximises_the_held_out_utility():
    conf = torch.tensor([0.9, 0.8, 0.6, 0.5, 0.4])
    correct = torch.tensor([True, True, False, True, False])
    w = torch.full((5,), 0.2)
    # utility = right experts + value × fallbacks; thresholds 0 / 0.5 / 0.8 give, for value v:
    # 3 + 0 / 3 + v / 2 + 3v (0.6 routes the wrong 0.6 again)
    assert choose_threshold(conf, correct, w, 0.6) == pytest.approx(0.8)  # 3.8 > 3.6 > 3
    assert choose_threshold(conf, correct, w, 0.3) == pytest.approx(0.5)  # 3.3 > 3 > 2.9
    assert choose_threshold(conf, correct, w, 0.0) == 0.0  # the shared model is worth nothing: route all
    assert choose_threshold(conf, correct, w, 0.5) == pytest.approx(0.5)  # a tie (3.5): the smaller one


def test_decisions_top_k_threshold_and_task_order():
    """LearnedRouter: SHARED below the threshold, top-k renormalised, columns in the artifact's order."""

    class Identity(nn.Module):
        def forward(self, batch):
            return batch["x"]

    net = RouterNet(3, 3)
    with torch.no_grad():
        net.net.weight.copy_(torch.eye(3))
        net.net.bias.zero_()
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]]))
    r = LearnedRouter(["a", "b", "c"], net, Identity(), threshold=0.5, top_k=1)
    assert r({"x": logits}).tolist() == [0, SHARED, 2]
    # a top-k mixture's confidence is its mass: 0.9, 0.75 and 0.9 here
    r2 = LearnedRouter(["a", "b", "c"], net, Identity(), threshold=0.8, top_k=2)
    mix = r2({"x": logits})
    assert mix.ids[0].tolist() == [0, 1] and mix.ids[1].tolist() == [SHARED, SHARED]
    torch.testing.assert_close(mix.weights[0], torch.tensor([0.7, 0.2]) / 0.9)
    assert mix.weights[1].tolist() == [0.0, 0.0] and mix.top1().tolist() == [0, SHARED, 2]
    # at 0.5 the second row (top-1 0.4, below it) is served the mix of its two likely tasks, not the fallback
    mix = LearnedRouter(["a", "b", "c"], net, Identity(), threshold=0.5, top_k=2)({"x": logits})
    assert mix.ids[1].tolist() == [0, 1]
    torch.testing.assert_close(mix.weights[1], torch.tensor([0.4, 0.35]) / 0.75)
    # max mixing: the top expert whole, the second at its probability relative to the top one
    mx = LearnedRouter(["a", "b", "c"], net, Identity(), threshold=0.5, top_k=2, mixing="max")({"x": logits})
    assert mx.ids.tolist() == mix.ids.tolist()
    torch.testing.assert_close(mx.weights, torch.tensor([[1.0, 0.2 / 0.7], [1.0, 0.35 / 0.4], [1.0, 0.125]]))
    with pytest.raises(DidiError, match="router.mixing: expected one of sum, max, found 'mean'"):
        LearnedRouter(["a", "b", "c"], net, Identity(), top_k=2, mixing="mean")
    # the artifact lists the tasks as c, a, b: ids index that order
    r3 = LearnedRouter(["a", "b", "c"], net, Identity(), top_k=1, order=["c", "a", "b"])
    assert r3({"x": logits}).tolist() == [1, 1, 0]
    with pytest.raises(DidiError, match="trained for tasks"):
        LearnedRouter(["a", "b", "c"], net, Identity(), order=["a", "b", "d"])
    with pytest.raises(DidiError, match="router.top_k"):
        LearnedRouter(["a", "b", "c"], net, Identity(), top_k=4)


# ------------------------------------------------------------------------------------- soft routing
class TinyNet(nn.Module):
    """Linear → LayerNorm → Linear, plus a free parameter (not inside a wrappable module)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)
        self.offset = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x)))) + self.offset


def _lowrank(g, name, m, n, r, scale=0.3):
    return {
        f"{name}::lora_A": scale * torch.randn(m, r, generator=g),
        f"{name}::lora_B": torch.randn(r, n, generator=g),
    }


def tiny_artifact(path, base_sd, swapped: bool, g):
    """3 tasks: low-rank experts on fc1/fc2, a dense bias delta and dense LayerNorm deltas (weight and bias);
    with `swapped`, also per-task terms on a parameter no wrapper handles (`offset`: mask·scale·ref)."""
    tasks = {}
    for j in range(3):
        t = {**_lowrank(g, "fc1.weight", 16, 8, 2), **_lowrank(g, "fc2.weight", 4, 16, 1)}
        t["fc1.bias::dense"] = 0.2 * torch.randn(16, generator=g)
        t["norm.weight::dense"] = 0.3 * torch.randn(16, generator=g)  # a routed LayerNorm, not swapped
        t["norm.bias::dense"] = 0.2 * torch.randn(16, generator=g)
        if swapped:
            t["offset::mask"] = (torch.rand(4, generator=g) > 0.3).float()
            t["offset::scale"] = torch.tensor(1.0 + j)
        tasks[f"t{j}"] = t
    shared = {**_lowrank(g, "fc1.weight", 16, 8, 1), "norm.bias::dense": 0.1 * torch.randn(16, generator=g)}
    if swapped:
        shared["offset::ref"] = torch.randn(4, generator=g)
    fold = {"fc2.bias": 0.1 * torch.randn(4, generator=g)}
    manifest = {
        "method": {"name": "test"},
        "adapter": {"name": "state_dict", "settings": {}},
        "sources": {"base": {"path": "unused"}},
        "tasks": list(tasks),
        "base_params": sum(v.numel() for v in base_sd.values()),
        "tensors": {
            n: {"shape": list(v.shape), "dtype": "float32", "matrix_shape": None} for n, v in base_sd.items()
        },
    }
    write_artifact(path, manifest, fold, shared, tasks)
    return load_artifact(path)


def dense_reference(model, art, base_sd, x, mix: Mixture) -> torch.Tensor:
    """Per example: θ0 + common + Σ_k w_k·(task delta_k − common), materialised and run alone."""
    common = art.common_deltas()
    own = {t: {k: v - common.get(k, 0) for k, v in art.task_deltas(t).items()} for t in art.tasks}
    outs = []
    for i in range(x.shape[0]):
        sd = {k: v.float() + common.get(k, 0) for k, v in base_sd.items()}
        for t, w in zip(mix.ids[i].tolist(), mix.weights[i].tolist()):
            if t != SHARED and w > 0:
                for k, d in own[art.tasks[t]].items():
                    sd[k] = sd[k] + w * d
        ref = copy.deepcopy(model)
        ref.load_state_dict(sd)
        with torch.no_grad():
            outs.append(ref(x[i : i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("swapped", [False, True], ids=["one_pass", "swapped_params"])
def test_soft_routing_equals_dense_mixture_and_top1_equals_hard(tmp_path, swapped):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = TinyNet().eval()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    art = tiny_artifact(tmp_path / "a", base_sd, swapped, g)
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    assert bool(routed.swapped) == swapped and isinstance(routed.model.norm, RoutedLayerNorm)
    B = 10
    x = torch.randn(B, 8, generator=g)
    # top-2 of random probabilities, renormalised; rows 3 and 7 fall back (no expert)
    probs = torch.softmax(torch.randn(B, 3, generator=g), -1)
    p, ids = probs.topk(2, -1)
    w = p / p.sum(-1, keepdim=True)
    w[[3, 7]] = 0.0
    ids[[3, 7]] = SHARED
    mix = Mixture(ids, w)
    with torch.no_grad():
        got = routed(x, task_ids=mix)
    torch.testing.assert_close(got, dense_reference(model, art, base_sd, x, mix), atol=1e-5, rtol=1e-5)

    # top-1 at weight 1 is the hard path, bit for bit (SHARED rows included)
    hard = torch.tensor([0, 2, 1, SHARED, 1, 0, 2, SHARED, 0, 1])
    one = Mixture(hard[:, None], (hard != SHARED).float()[:, None])
    two = Mixture(
        torch.stack([hard, (hard + 1) % 3], 1), torch.stack([(hard != SHARED).float(), torch.zeros(B)], 1)
    )
    with torch.no_grad():
        want = routed(x, task_ids=hard)
        assert torch.equal(routed(x, task_ids=one), want)
        assert torch.equal(routed(x, task_ids=two), want)  # a second slot of weight 0 adds nothing
    torch.testing.assert_close(want, dense_reference(model, art, base_sd, x, one), atol=1e-5, rtol=1e-5)

    # the fallback is exactly the shared model: θ0 + common, whatever the other rows do
    shared_model = copy.deepcopy(model)
    common = art.common_deltas()
    shared_model.load_state_dict({k: v + common[k] if k in common else v for k, v in base_sd.items()})
    with torch.no_grad():
        ref = shared_model(x)
        assert torch.equal(routed(x, task_ids=torch.full((B,), SHARED)), ref)  # one-task fast path
        routed.fast_path = False
        assert torch.equal(routed(x, task_ids=torch.full((B,), SHARED)), ref)  # grouped path
        routed.fast_path = True
        torch.testing.assert_close(routed(x, task_ids=mix)[[3, 7]], ref[[3, 7]], atol=1e-6, rtol=0)
    with pytest.raises(DidiError, match="weights must be finite and ≥ 0"):
        Mixture(ids, -w)
    with pytest.raises(DidiError, match="task id 3 is outside"):
        routed(x, task_ids=Mixture(torch.full((B, 1), 3), torch.ones(B, 1)))


# ------------------------------------------------------------------------------------ tiny BERT zoo
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A 3-task tiny-BERT zoo whose tasks use disjoint vocabularies (trivially separable inputs), heads beside
    each fine-tune, train.jsonl (the router's inputs) and test.jsonl per task, a DiDi artifact and baseline
    artifacts (TALL-masks, Twin), and one router trained for the DiDi artifact."""
    from didi.methods import apply_method

    root = tmp_path_factory.mktemp("router")
    base, tasks, data = make_text_task_zoo(root, {"train.jsonl": 40, "test.jsonl": 10})
    zoo = Zoo(build_adapter("hf_encoder"), base, tasks)
    didi = tiny_merge(zoo, root / "didi")
    arts = {"didi": didi}
    for m in ("tall_masks", "twin"):
        arts[m] = apply_method(m, zoo, root / m)
    router = train_router(didi, data, options=RouterOptions(layer="embedding", steps=100), trainer=CPU)
    return {
        "root": root,
        "base": base,
        "tasks": tasks,
        "zoo": zoo,
        "data": data,
        "arts": arts,
        "router": router,
    }


def shared_accuracy(s, art) -> dict[str, float]:
    """Per task: accuracy of θ0 + common (fold + shared terms) with the task's head, one text at a time."""
    from transformers import AutoTokenizer

    adapter = art.adapter()
    base_sd = dict(adapter.open_source(s["base"]).items())
    common = art.common_deltas()
    model = adapter.build_model(
        {k: (v.float() + common[k]).to(v.dtype) if k in common else v for k, v in base_sd.items()}
    )
    tok = AutoTokenizer.from_pretrained(os.path.join(s["base"], "0_Transformer"), local_files_only=True)
    out = {}
    with torch.no_grad():
        for t, d in s["data"].items():
            head = load_head(os.path.join(s["tasks"][t], "head.safetensors"))
            exs = [json.loads(x) for x in open(os.path.join(d, "test.jsonl"))]
            hits = 0
            for e in exs:
                enc = tok([e["text"]], return_tensors="pt")
                h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                hits += int(head(mean_pool(h, enc["attention_mask"])).argmax(-1).item() == e["label"])
            out[t] = hits / len(exs)
    return out


def test_saved_router_records_what_it_is(bert):
    path = bert["router"]
    assert path == bert["arts"]["didi"] / "router"
    assert sorted(p.name for p in path.iterdir()) == ["router.json", "router.safetensors"]
    cfg = json.loads((path / "router.json").read_text())
    assert cfg["tasks"] == ["task0", "task1", "task2"] and cfg["adapter"]["name"] == "hf_encoder"
    assert cfg["features"] == {"layer": "embedding", "pooling": "auto", "kind": "text"}
    assert cfg["network"] == {"kind": "linear", "dim": 32, "hidden": 0}
    assert cfg["training"]["routing_accuracy"] == 1.0 and cfg["threshold"] == 0.0
    assert cfg["training"]["data"]["task0"].endswith("train.jsonl")  # train split, the test one never
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no temporary left


@pytest.mark.parametrize("method", ["didi", "tall_masks", "twin"])
def test_learned_evaluation_equals_oracle_when_routing_is_perfect(bert, method, tmp_path):
    art = bert["arts"][method]
    # DiDi's own router; the baselines read the same router (same tasks and θ0) from the DiDi artifact
    router = "learned" if method == "didi" else str(bert["router"])
    rep = evaluate_artifact(art, bert["data"], batch_size=4, trainer=CPU, router=router, output=tmp_path)
    oracle = evaluate_artifact(art, bert["data"], batch_size=4, trainer=CPU)
    for t, v in rep["tasks"].items():
        assert v["routing_accuracy"] == 1.0 and v["fallback"] == 0.0
        assert v["accuracy"] == oracle["tasks"][t]["accuracy"] == v["oracle_accuracy"]
    assert rep["routing_accuracy"] == 1.0 and rep["average_oracle"] == oracle["average"]
    assert rep["router"]["kind"] == "learned" and rep["router"]["top_k"] == 1
    md = (tmp_path / "report.md").read_text()
    assert "routed to own task" in md and "oracle accuracy" in md


def test_fallback_serves_the_shared_model_and_soft_routing_runs(bert):
    for method in ("didi", "twin"):
        art = load_artifact(bert["arts"][method])
        rep = evaluate_artifact(
            art.path,
            bert["data"],
            batch_size=4,
            trainer=CPU,
            router=str(bert["router"]),
            threshold=1.0,
            compare_oracle=False,
        )
        want = shared_accuracy(bert, art)
        for t, v in rep["tasks"].items():
            assert v["fallback"] == 1.0 and v["routing_accuracy"] == 0.0
            assert v["accuracy"] == pytest.approx(want[t], abs=1e-12), (method, t)
    # top-2 mixing through a model with per-task swapped parameters (TALL masks LayerNorms): it runs, and
    # routes every example to its own task first
    rep = evaluate_artifact(
        bert["arts"]["tall_masks"],
        bert["data"],
        batch_size=4,
        limit_per_task=4,
        trainer=CPU,
        router=str(bert["router"]),
        top_k=2,
        compare_oracle=False,
    )
    assert rep["router"]["top_k"] == 2 and all(v["routing_accuracy"] == 1.0 for v in rep["tasks"].values())


# ----------------------------------------------------------------------------------------- bad input
def test_bad_validation_data(bert, tmp_path):
    art, data = bert["arts"]["tall_masks"], bert["data"]

    def train(d, **kw):
        return train_router(art, d, output=tmp_path / "r", options=FAST, trainer=CPU, **kw)

    with pytest.raises(DidiError, match="no validation data given"):
        train({})
    with pytest.raises(DidiError, match="no validation data for task 'task2'"):
        train({t: data[t] for t in ("task0", "task1")})
    with pytest.raises(DidiError, match="task 'nope' is not in the artifact"):
        train({**data, "nope": data["task0"]})
    only_test = tmp_path / "only_test"
    write_jsonl(only_test / "test.jsonl", [{"text": "w1", "label": 0}])
    with pytest.raises(
        DidiError, match="has no validation.jsonl, val.jsonl, train.jsonl .*never trains on test"
    ):
        train({**data, "task1": str(only_test)})
    with pytest.raises(DidiError, match="is a test split"):
        train({**data, "task1": str(only_test / "test.jsonl")})
    with pytest.raises(DidiError, match="split: the router never trains on the test split"):
        train(data, split="test")
    empty = tmp_path / "empty"
    write_jsonl(empty / "validation.jsonl", [])
    with pytest.raises(DidiError, match="task 'task0': no validation inputs in .*validation.jsonl"):
        train({**data, "task0": str(empty)})
    (tmp_path / "junk.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DidiError, match=r"junk.jsonl:1: expected a JSON object with 'text'"):
        train({**data, "task0": str(tmp_path / "junk.jsonl")})
    with pytest.raises(DidiError, match="router.top_k: expected 1..3"):
        train_router(art, data, output=tmp_path / "r", options=RouterOptions(top_k=4), trainer=CPU)
    with pytest.raises(DidiError, match="router.layer: block 7 is outside the model's 2 blocks"):
        train_router(art, data, output=tmp_path / "r", options=RouterOptions(layer="7"), trainer=CPU)
    with pytest.raises(DidiError, match="router.threshold: expected auto, none or a confidence"):
        train_router(art, data, output=tmp_path / "r", options=RouterOptions(threshold=1.5), trainer=CPU)
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r*"))  # nothing half-written
    with pytest.raises(DidiError, match="a router is already there; pass --overwrite true"):
        train_router(bert["arts"]["didi"], data, options=FAST, trainer=CPU)


def test_router_for_other_tasks_or_backbone_is_refused(bert, tmp_path):
    from didi.methods import apply_method

    data, router = bert["data"], bert["router"]
    # an artifact of two of the three tasks: the three-task router does not fit it, nor its router the others
    two = Zoo(build_adapter("hf_encoder"), bert["base"], {t: bert["tasks"][t] for t in ("task0", "task1")})
    art2 = apply_method("tall_masks", two, tmp_path / "two")
    with pytest.raises(
        DidiError, match=r"router trained for tasks \['task0', 'task1', 'task2'\].*artifact has no"
    ):
        load_router(router, art2)
    r2 = train_router(art2, {t: data[t] for t in ("task0", "task1")}, options=FAST, trainer=CPU)
    with pytest.raises(DidiError, match=r"router trained for tasks.*does not know \['task2'\]"):
        evaluate_artifact(bert["arts"]["didi"], data, trainer=CPU, router=str(r2))
    # the same tasks merged from another θ0
    base_b, tasks_b = make_bert_zoo(tmp_path / "zoo_b", seed=3)
    other = apply_method("tall_masks", Zoo(build_adapter("hf_encoder"), base_b, tasks_b), tmp_path / "b")
    with pytest.raises(DidiError, match="router trained on another θ0"):
        load_router(router, other)
    # another adapter (settings differ): a backbone the router was not trained on
    cfg = json.loads((router / "router.json").read_text())
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "router.safetensors").write_bytes((router / "router.safetensors").read_bytes())
    (forged / "router.json").write_text(json.dumps({**cfg, "adapter": {"name": "open_clip", "settings": {}}}))
    with pytest.raises(DidiError, match="router trained on another backbone"):
        load_router(forged, bert["arts"]["didi"])
    # a modified weights file, a missing router, a learned router asked for on an artifact without one
    (forged / "router.json").write_text(json.dumps(cfg))
    (forged / "router.safetensors").write_bytes(b"x" + (router / "router.safetensors").read_bytes()[1:])
    with pytest.raises(DidiError, match="sha256 does not match router.json"):
        load_router(forged, bert["arts"]["didi"])
    with pytest.raises(DidiError, match="no router there"):
        load_router(tmp_path / "nowhere", bert["arts"]["didi"])
    with pytest.raises(DidiError, match="has no router .*didi router train"):
        evaluate_artifact(bert["arts"]["twin"], data, trainer=CPU, router="learned")
    with pytest.raises(DidiError, match="top_k / threshold / mixing: they set a learned router"):
        evaluate_artifact(bert["arts"]["twin"], data, trainer=CPU, top_k=2)
    with pytest.raises(DidiError, match="top_k / threshold / mixing: they set a learned router"):
        evaluate_artifact(bert["arts"]["twin"], data, trainer=CPU, mixing="max")


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_router_train_and_evaluate(bert, tmp_path, capsys):
    from didi.cli import build_parser, main

    data = json.dumps(bert["data"])
    quiet = ["--trainer.accelerator", "cpu", "--trainer.progress_bar", "false"]
    out = tmp_path / "router"
    argv = ["router", "train", str(bert["arts"]["twin"]), "--data", data, "--output", str(out)]
    assert (
        main([*argv, "--router.steps", "100", "--router.top_k", "2", "--limit_per_task", "30", *quiet]) == 0
    )
    assert "routing accuracy on held-out inputs: 100.0 %" in capsys.readouterr().out
    assert json.loads((out / "router.json").read_text())["top_k"] == 2
    assert main([*argv, *quiet]) == 2  # exists, no --overwrite
    assert "a router is already there" in capsys.readouterr().err
    rep_dir = tmp_path / "rep"
    ev = ["evaluate", str(bert["arts"]["twin"]), data, "--router", str(out), "--output", str(rep_dir)]
    assert main([*ev, "--batch_size", "8", "--limit_per_task", "3", "--compare_oracle", "false", *quiet]) == 0
    assert "routed to own task" in capsys.readouterr().out
    rep = json.loads((rep_dir / "report.json").read_text())
    assert rep["routing_accuracy"] == 1.0 and rep["router"]["top_k"] == 2
    bad = [
        "router",
        "train",
        str(bert["arts"]["twin"]),
        "--data",
        json.dumps({"task0": bert["data"]["task0"]}),
    ]
    assert main([*bad, "--output", str(tmp_path / "r2"), *quiet]) == 2
    assert "no validation data for task 'task1'" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    # help: the group, the subcommand's examples and options, evaluate's router flags
    parser = build_parser()
    group = parser._subcommands_action._name_parser_map["router"]
    text = group._subcommands_action._name_parser_map["train"].format_help()
    assert "examples:" in text and "didi router train merged/" in text and "--router.layer" in text
    assert "Args:" not in text
    ev_help = " ".join(parser._subcommands_action._name_parser_map["evaluate"].format_help().split())
    assert "--router ROUTER" in ev_help and "--router learned" in ev_help and "--threshold" in ev_help


# ------------------------------------------------------------------------------------------------ images
def _png(path, g, low: int, high: int) -> None:
    from PIL import Image

    arr = (low + torch.rand(20, 24, 3, generator=g) * (high - low)).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.mark.parametrize(
    "layer,pooling", [("final", "auto"), ("embedding", "auto"), ("0", "mean"), ("final", "cls")]
)
def test_image_router_on_open_clip(tmp_path, layer, pooling):
    """A tiny open_clip artifact; dark images for one task, bright for the other (validation/ and test/
    folders): every layer choice routes them apart, and the learned evaluation equals the oracle one."""
    from didi.backbones.open_clip import OpenClipAdapter
    from helpers import OPEN_CLIP_TINY

    adapter = OpenClipAdapter(model_config=OPEN_CLIP_TINY)
    torch.manual_seed(0)
    base_sd = {k: v.detach().clone() for k, v in adapter.create("cpu").state_dict().items()}
    save_file(base_sd, str(tmp_path / "base.safetensors"))
    g = torch.Generator().manual_seed(1)
    data, heads = {}, {}
    for t, (low, high) in {"dark": (0, 90), "bright": (165, 255)}.items():
        for split, n in (("validation", 12), ("test", 4)):
            for c in ("a", "b"):
                for i in range(n):
                    _png(tmp_path / "data" / t / split / c / f"{i}.png", g, low, high)
        data[t] = str(tmp_path / "data" / t)
        heads[t] = str(tmp_path / f"{t}.head.safetensors")
        save_file({"weight": torch.randn(2, 16, generator=g)}, heads[t])
    fc = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    tensors = {
        k: {"shape": list(v.shape), "dtype": "float32", "matrix_shape": None}
        for k, v in base_sd.items()
        if adapter.in_scope(k)
    }
    tasks = {t: _lowrank(g, fc, 128, 32, 2, 1.0) for t in data}
    manifest = {
        "method": {"name": "handmade"},
        "adapter": {"name": "open_clip", "settings": adapter.settings()},
        "sources": {"base": {"path": str(tmp_path / "base.safetensors")}},
        "tasks": list(tasks),
        "base_params": sum(base_sd[k].numel() for k in tensors),
        "tensors": tensors,
    }
    art = write_artifact(tmp_path / "art", manifest, {}, {}, tasks)
    opts = RouterOptions(layer=layer, pooling=pooling, steps=60, lr=0.05)
    path = train_router(art, data, options=opts, batch_size=8, trainer=CPU)
    cfg = json.loads((path / "router.json").read_text())
    assert cfg["features"]["kind"] == "image" and cfg["training"]["routing_accuracy"] == 1.0
    assert cfg["network"]["dim"] == (16 if (layer, pooling) == ("final", "auto") else 32)
    assert all(p.endswith("validation") for p in cfg["training"]["data"].values())
    rep = evaluate_artifact(art, data, heads=heads, batch_size=4, trainer=CPU, router="learned")
    for v in rep["tasks"].values():
        assert v["routing_accuracy"] == 1.0 and v["accuracy"] == v["oracle_accuracy"]


def test_tasks_sharing_their_inputs_are_reported_as_confused():
    """Two tasks with the same inputs (other labels) cannot be separated by any input router: the fit reports
    that pair, and only it."""
    feats = toy_features(3, 60, gap=12.0, seed=2)
    g = torch.Generator().manual_seed(3)
    feats["t3"] = feats["t0"][torch.randperm(60, generator=g)]  # t3's inputs are t0's
    fitted = fit_router(feats, RouterOptions(threshold="none", steps=60, lr=0.05), CPU)
    pairs = fitted.record["confused_pairs"]
    assert [p["tasks"] for p in pairs] == [["t0", "t3"]], pairs
    assert pairs[0]["pair_accuracy"] <= 0.75
    (warning,) = confusion_warnings(fitted.record)
    assert warning.startswith("warning: t0 and t3 are confused") and "--router.confused task_id" in warning
    assert confusion_warnings(fit_router(toy_features(3, 60, 12.0, 2), FAST, CPU).record) == []


def test_confused_pairs_by_hand():
    from didi.router import confused_pairs

    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    top1 = torch.tensor([0, 0, 0, 1, 0, 0, 1, 2, 2, 2])
    # pair (0, 1): inputs of 0 or 1 routed to 0 or 1: 7; right: 3 + 1 = 4 → 4/7; pair (1, 2): 1 + 2 = 3 of
    # 4 (0.75, at the bound); pair (0, 2): 3 + 2 = 5 of 5
    pairs = confused_pairs(top1, y, ["a", "b", "c"])
    assert [p["tasks"] for p in pairs] == [["a", "b"], ["b", "c"]]
    assert [p["pair_accuracy"] for p in pairs] == pytest.approx([4 / 7, 0.75])
    assert pairs[0]["sent_to_other"] == pytest.approx([1 / 4, 2 / 4])


def test_confused_groups_are_the_connected_pairs():
    from didi.router import confused_groups

    pairs = [{"tasks": ["c", "a"]}, {"tasks": ["d", "e"]}, {"tasks": ["a", "f"]}]
    assert confused_groups(pairs, list("abcdef")) == [["a", "c", "f"], ["d", "e"]]
    assert confused_groups([], list("ab")) == []


def test_flattening_a_group_by_hand():
    """p_i ← p_G · softmax(s · log p_i) within the group, the group's total and every other column kept."""
    from didi.router import flatten_groups

    p = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.3, 0.6]])
    even = flatten_groups(p, [[0, 1]], [0.0])
    torch.testing.assert_close(even, torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.2, 0.6]]))
    assert torch.equal(flatten_groups(p, [[0, 1]], [1.0]), p)
    half = flatten_groups(p, [[0, 1]], [0.5])
    w = torch.tensor([0.6, 0.2]).sqrt()
    torch.testing.assert_close(half[0, :2], 0.8 * w / w.sum())


def test_group_scale_follows_what_the_router_knows_within_the_group():
    """On held-out inputs of a pair: a router whose preference inside the pair is right keeps it (s = 1); one
    whose preference is unrelated to the task (identical inputs) is flattened (s = 0)."""
    from didi.router import fit_group_scale

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 50 + [2] * 20)
    w = torch.ones(len(y))
    knows = torch.full((len(y), 3), 0.05)
    knows[torch.arange(100), y[:100]] = 0.85
    knows[100:, 2] = 0.9
    assert fit_group_scale(knows, y, w, [0, 1]) == 1.0
    noise = torch.rand(100, generator=g) * 0.9  # the share of the pair's mass on task 0, whatever the input
    blind = torch.stack([noise, 0.9 - noise, torch.full((100,), 0.1)], -1)
    blind = torch.cat([blind, knows[100:]])
    assert fit_group_scale(blind, y, w, [0, 1]) == 0.0


def test_tasks_sharing_their_inputs_get_their_experts_in_equal_parts(tmp_path):
    """`confused: calibrate` flattens the pair of tasks that share their inputs (and nothing else); a saved
    router's mixture then gives an input of that pair both experts at 0.5 each with top-2 sum mixing, while
    `keep` (the default) mixes by the router's noise."""
    feats = toy_features(3, 60, gap=12.0, seed=2)
    g = torch.Generator().manual_seed(3)
    feats["t3"] = feats["t0"][torch.randperm(60, generator=g)]
    opts = RouterOptions(threshold="none", steps=60, lr=0.05, top_k=2, confused="calibrate")
    fitted = fit_router(feats, opts, CPU)
    (group,) = fitted.groups
    assert group["tasks"] == ["t0", "t3"] and group["scale"] <= 0.25
    tasks = fitted.tasks
    router = LearnedRouter(tasks, fitted.net, nn.Identity(), fitted.temperature, 0.0, 2, groups=fitted.groups)
    x = feats["t0"][:20]
    with torch.no_grad():
        mix = router.decide(torch.softmax(fitted.net(x) / fitted.temperature, -1))
    pair = {tasks.index("t0"), tasks.index("t3")}
    assert all(set(r) == pair for r in mix.ids.tolist())
    spread = (mix.weights[:, 0] - mix.weights[:, 1]).abs()
    keep = fit_router(
        feats, RouterOptions(threshold="none", steps=60, lr=0.05, top_k=2, confused="keep"), CPU
    )
    assert keep.groups == [] and keep.record["confused_pairs"] == fitted.record["confused_pairs"]
    with torch.no_grad():
        raw = LearnedRouter(tasks, keep.net, nn.Identity(), keep.temperature, 0.0, 2).decide(
            torch.softmax(keep.net(x) / keep.temperature, -1)
        )
    assert float(spread.max()) < float((raw.weights[:, 0] - raw.weights[:, 1]).abs().max())
    if group["scale"] == 0.0:
        torch.testing.assert_close(mix.weights, torch.full_like(mix.weights, 0.5))
    info = {"features": {"layer": "final", "pooling": "auto"}}
    path = save_router(fitted, tmp_path / "router", info)
    assert "confused group t0, t3: its probability is" in router_summary(path)
    with pytest.raises(DidiError, match="router.confused"):
        RouterOptions(confused="merge").validate(3)


def test_picking_a_group_task_by_task_id_by_hand():
    """A row whose task id is in the group gets the group's whole probability on that task; a row whose task
    is outside the group, or without one (-1), keeps the router's probabilities."""
    from didi.router import pick_by_task_id

    probs = torch.tensor(
        [[0.3, 0.1, 0.2, 0.4], [0.3, 0.1, 0.2, 0.4], [0.3, 0.1, 0.2, 0.4], [0.3, 0.1, 0.2, 0.4]]
    )
    out = pick_by_task_id(probs, [[0, 3]], torch.tensor([0, 3, 1, -1]))
    torch.testing.assert_close(out[0], torch.tensor([0.7, 0.1, 0.2, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.1, 0.2, 0.7]))
    torch.testing.assert_close(out[2:], probs[2:])
    torch.testing.assert_close(probs[0], torch.tensor([0.3, 0.1, 0.2, 0.4]))  # the input is not modified


class _Read(nn.Module):
    """Features of a test batch: its "x" field (the feature vectors themselves)."""

    def forward(self, batch):
        return batch["x"]


def test_tasks_sharing_their_inputs_are_served_by_their_task_ids(tmp_path):
    """`confused: task_id`: the router still places each input (here: in the pair of tasks that share their
    inputs, or elsewhere); inside the pair the input's task id picks the expert. Inputs of the pair then go
    to their own task as with the oracle, a row without a task id (-1) is routed as `keep` routes it, and a
    batch without `task_id` is refused."""
    feats = toy_features(3, 60, gap=12.0, seed=2)
    g = torch.Generator().manual_seed(3)
    feats["t3"] = feats["t0"][torch.randperm(60, generator=g)]
    fitted = fit_router(feats, RouterOptions(threshold="none", steps=60, lr=0.05, confused="task_id"), CPU)
    (group,) = fitted.groups
    assert group == {"tasks": ["t0", "t3"], "scale": 1.0, "by": "task_id"}
    (note,) = confusion_warnings(fitted.record)
    assert note.startswith("note: t0 and t3 are confused") and "served by its task id" in note
    tasks = fitted.tasks
    i0, i3 = tasks.index("t0"), tasks.index("t3")
    router = LearnedRouter(tasks, fitted.net, _Read(), fitted.temperature, 0.0, 1, groups=fitted.groups)
    x = torch.cat([feats["t0"][:20], feats["t1"][:20]])
    for own in (i0, i3):
        ids = router({"x": x[:20], "task_id": [tasks[own]] * 20})
        assert ids.tolist() == [own] * 20  # the oracle's choice for every input of the pair
    assert router({"x": x[20:], "task_id": torch.full((20,), i0)}).tolist() == [tasks.index("t1")] * 20
    with torch.no_grad():
        own_choice = router.decide(router.probabilities({"x": x[:20]}))
    assert router({"x": x[:20], "task_id": [-1] * 20}).tolist() == own_choice.tolist()
    assert set(own_choice.tolist()) == {i0, i3}  # by the input alone the pair is split by noise
    with pytest.raises(DidiError, match="no 'task_id' field"):
        router({"x": x[:20]})
    with pytest.raises(DidiError, match="unknown task 'nope'"):
        router({"x": x[:2], "task_id": ["t0", "nope"]})
    two = LearnedRouter(tasks, fitted.net, _Read(), fitted.temperature, 0.0, 2, groups=fitted.groups)
    mix = two({"x": x[:20], "task_id": [i3] * 20})
    assert (mix.top1() == i3).all() and not (mix.ids == i0).any()  # the other task of the pair gets nothing
    path = save_router(fitted, tmp_path / "router", {"features": {"layer": "final", "pooling": "auto"}})
    assert "confused group t0, t3: its probability is given to each input's task id" in router_summary(path)
    assert json.loads((path / "router.json").read_text())["confused_groups"] == [group]


def test_learned_evaluation_with_task_ids_for_a_shared_input_pair_equals_oracle(bert, tmp_path):
    """End to end on the tiny BERT zoo with task2's inputs replaced by task0's (the two tasks share their
    inputs): a router trained with `confused: task_id` serves every task as the oracle does, a `keep` router
    does not route the pair right."""
    data = dict(bert["data"])
    same = tmp_path / "task2"
    same.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (same / name).write_text(open(os.path.join(data["task0"], name)).read())
    data["task2"] = str(same)
    art = bert["arts"]["didi"]
    opts = dict(layer="embedding", steps=100)
    by_id = train_router(
        art, data, tmp_path / "by_id", RouterOptions(confused="task_id", **opts), trainer=CPU
    )
    keep = train_router(art, data, tmp_path / "keep", RouterOptions(**opts), trainer=CPU)
    cfg = json.loads((by_id / "router.json").read_text())
    assert cfg["confused_groups"] == [{"tasks": ["task0", "task2"], "scale": 1.0, "by": "task_id"}]
    oracle = evaluate_artifact(art, data, batch_size=4, trainer=CPU)
    rep = evaluate_artifact(art, data, batch_size=4, trainer=CPU, router=str(by_id))
    for t, v in rep["tasks"].items():
        assert v["routing_accuracy"] == 1.0 and v["accuracy"] == oracle["tasks"][t]["accuracy"]
    rep_keep = evaluate_artifact(art, data, batch_size=4, trainer=CPU, router=str(keep))
    assert (
        rep_keep["tasks"]["task0"]["routing_accuracy"] < 1.0
        or rep_keep["tasks"]["task2"]["routing_accuracy"] < 1.0
    )
