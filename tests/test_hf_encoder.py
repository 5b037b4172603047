"""The hf_encoder adapter: HF / sentence-transformers layouts, a tiny BERT zoo merged end to end and served
routed, and the real all-MiniLM-L6-v2 loaded offline."""

from __future__ import annotations

import json
import os

import pytest
import torch

from didi.artifact import load_artifact
from didi.backbones import Zoo, build_adapter
from didi.backbones.hf_encoder import HFEncoderAdapter, minilm_path, resolve_model_dir
from didi.errors import DidiError
from didi.routing import RoutedModel
from helpers import make_bert_zoo, save_hf, tiny_bert_config, tiny_merge

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def per_example(adapter, art, base_sd, batch, ids):
    outs = []
    for i in range(len(ids)):
        m = adapter.build_model(art.task_state_dict(art.tasks[int(ids[i])], base=base_sd))
        outs.append(m(**{k: v[i : i + 1] for k, v in batch.items()}).last_hidden_state)
    return torch.cat(outs)


@pytest.mark.parametrize("policy", ["shared", "per_task"])
def test_tiny_bert_zoo_merges_and_routes(tmp_path, policy):
    base, tasks = make_bert_zoo(tmp_path / "zoo")
    adapter = build_adapter("hf_encoder", {"nonmatrix_policy": policy})
    zoo = Zoo(adapter, base, tasks)
    decomposed = {p.name for p in zoo.matrices}
    assert len(decomposed) == 12  # 2 layers × (q, k, v, attn out, intermediate, output)
    assert "embeddings.word_embeddings.weight" not in decomposed and "pooler.dense.weight" not in decomposed
    # per_task pays for every task's vector (and pooler) deltas, so it gets a larger budget
    art = load_artifact(tiny_merge(zoo, tmp_path / "merged", budget=1.3 if policy == "shared" else 1.6))
    assert art.manifest["adapter"]["settings"]["model_config"]["model_type"] == "bert"
    # a fresh adapter from the manifest rebuilds θ0 (config recorded in the artifact) and the routed model
    adapter2 = art.adapter()
    base_sd = dict(adapter2.open_source(base).items())
    routed = RoutedModel(adapter2.build_model(base_sd), art)
    # per_task: also the pooler Linear and the 5 LayerNorms; every per-task term sits on a routed layer, so a
    # mixed batch runs in one pass (nothing swapped per task)
    assert len(routed.routed) == (18 if policy == "per_task" else 12) and not routed.swapped
    g = torch.Generator().manual_seed(3)
    batch = {
        "input_ids": torch.randint(0, 50, (7, 9), generator=g),
        "attention_mask": torch.ones(7, 9, dtype=torch.long),
    }
    batch["attention_mask"][1, 5:] = 0
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    expect = per_example(adapter2, art, base_sd, batch, ids)
    got = routed(**batch, task_ids=ids).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expect[keep], atol=2e-5, rtol=1e-4)
    # the merged task model is close to the real fine-tune (the merge did its job) and differs between tasks
    ft = adapter2.build_model(dict(adapter2.open_source(tasks["task1"]).items()))
    one = {k: v[:1] for k, v in batch.items()}
    out_ft = ft(**one).last_hidden_state
    out_base = adapter2.build_model(base_sd)(**one).last_hidden_state
    out_routed = routed(**one, task_ids=1).last_hidden_state
    assert (out_routed - out_ft).norm() < 0.5 * (out_base - out_ft).norm()


def test_layouts_and_bad_inputs(tmp_path):
    from transformers import BertModel

    torch.manual_seed(0)
    m = BertModel(tiny_bert_config())
    hf = save_hf(m, tmp_path / "hf")
    st = save_hf(m, tmp_path / "st", st_layout=True)
    assert resolve_model_dir(hf) == hf and resolve_model_dir(st) == st / "0_Transformer"
    a = HFEncoderAdapter()
    sd = dict(a.open_source(st).items())
    rebuilt = a.build_model(sd)
    x = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(
        rebuilt(input_ids=x).last_hidden_state, m.eval()(input_ids=x).last_hidden_state
    )
    with pytest.raises(DidiError, match="expected config.json and model.safetensors"):
        (tmp_path / "empty").mkdir()
        resolve_model_dir(tmp_path / "empty")
    bad = dict(sd)
    bad["encoder.layer.0.attention.self.query.weight"] = torch.zeros(3, 3)
    with pytest.raises(DidiError, match=r"'encoder.layer.0.attention.self.query.weight' has shape \[3, 3\]"):
        a.build_model(bad)
    with pytest.raises(DidiError, match="lacks 'encoder.layer.1"):
        a.build_model({k: v for k, v in sd.items() if "layer.1." not in k})
    cfg = json.loads((hf / "config.json").read_text())
    with pytest.raises(DidiError, match="does not know model_type"):
        HFEncoderAdapter(model_config={**cfg, "model_type": "no_such_model"}).build_model(sd)
    # word embeddings are decomposed only on request
    shape = (50, 32)
    assert not a.is_decomposed("embeddings.word_embeddings.weight", shape, torch.float32)
    assert HFEncoderAdapter(decompose_word_embeddings=True).is_decomposed(
        "embeddings.word_embeddings.weight", shape, torch.float32
    )


@pytest.mark.slow
def test_real_minilm_loads_offline():
    from transformers import AutoModel

    path = minilm_path()
    a = HFEncoderAdapter()
    src = a.open_source(path)
    model = a.build_model(dict(src.items()))
    n = sum(p.numel() for p in model.parameters())
    assert n == 22_713_216  # all-MiniLM-L6-v2 without a pooler: 22.7M
    ref = AutoModel.from_pretrained(str(path), local_files_only=True).eval()  # transformers' own loader
    x = torch.tensor([[101, 7592, 2088, 102]])
    torch.testing.assert_close(model(input_ids=x).last_hidden_state, ref(input_ids=x).last_hidden_state)
