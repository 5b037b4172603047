"""`didi finetune`: a tiny BERT learns a separable task; the output is in the adapter's format with a head."""

from __future__ import annotations

import json
import os

import pytest
import torch

from didi.backbones import Zoo, build_adapter
from didi.datamodules.text import write_jsonl
from didi.errors import DidiError
from didi.evaluate import evaluate_models
from didi.finetune import FinetuneConfig, finetune_zoo
from didi.trainer import TrainerConfig
from helpers import WORDS, add_vocab, save_hf, tiny_bert_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU1 = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=False)


def task_data(root, name, key_words, n=64, seed=0):
    """Label 1 iff the sentence contains one of `key_words`: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    exs = []
    for i in range(n):
        words = [WORDS[10 + int(j)] for j in torch.randint(0, 30, (5,), generator=g)]
        label = i % 2
        if label:
            words[int(torch.randint(0, 5, (1,), generator=g))] = key_words[i % len(key_words)]
        exs.append({"text": " ".join(words), "label": label})
    write_jsonl(root / name / "train.jsonl", exs)
    write_jsonl(root / name / "test.jsonl", exs[: n // 2])
    return str(root / name)


@pytest.mark.slow
def test_finetune_writes_zoo_that_learns_and_merges(tmp_path):
    from transformers import BertModel

    torch.manual_seed(0)
    base = save_hf(BertModel(tiny_bert_config()), tmp_path / "base")
    add_vocab(base)
    data = {
        "a": task_data(tmp_path / "data", "a", ["w1", "w2"]),
        "b": task_data(tmp_path / "data", "b", ["w5"], seed=1),
    }
    cfg = FinetuneConfig(steps=40, lr=3e-3, head_lr=3e-2, batch_size=16, max_length=16, warmup_steps=1)
    zoo = finetune_zoo(str(base), data, str(tmp_path / "zoo"), cfg, CPU1)
    for t, d in zoo.items():
        files = set(os.listdir(d))
        assert {"model.safetensors", "config.json", "head.safetensors", "head.json", "vocab.txt"} <= files
        assert json.loads(open(os.path.join(d, "head.json")).read())["num_classes"] == 2
    # the zoo is a valid merge input: same tensors as θ0; embeddings frozen by default, the layers changed
    z = Zoo(build_adapter("hf_encoder"), str(base), zoo)
    emb, _ = z.read("embeddings.word_embeddings.weight")
    q0, qs = z.read("encoder.layer.0.attention.self.query.weight")
    assert all(torch.equal(e, emb) for e in z.read("embeddings.word_embeddings.weight")[1])
    assert all((q - q0).abs().max() > 1e-4 for q in qs)
    # it learned: each fine-tune beats θ0 + its own head on its task
    rep = evaluate_models(zoo, {t: d for t, d in data.items()}, batch_size=16, trainer=CPU1)
    pre = evaluate_models(
        {"*": str(base)},
        data,
        tokenizer=str(base),
        batch_size=16,
        trainer=CPU1,
        heads={t: os.path.join(d, "head.safetensors") for t, d in zoo.items()},
    )
    for t in data:
        assert rep["tasks"][t]["accuracy"] >= 0.9, rep
        assert rep["tasks"][t]["accuracy"] > pre["tasks"][t]["accuracy"]
    # cached: a second call keeps the finished tasks (same file, untouched)
    mtime = os.path.getmtime(os.path.join(zoo["a"], "model.safetensors"))
    finetune_zoo(str(base), data, str(tmp_path / "zoo"), cfg, CPU1)
    assert os.path.getmtime(os.path.join(zoo["a"], "model.safetensors")) == mtime


def test_finetune_bad_data(tmp_path):
    from didi.finetune import finetune_task

    one_class = tmp_path / "one"
    write_jsonl(one_class / "train.jsonl", [{"text": "w1", "label": 0}] * 4)
    with pytest.raises(DidiError, match="needs two classes"):
        finetune_task(str(tmp_path), str(one_class), tmp_path / "out")
    write_jsonl(tmp_path / "empty" / "train.jsonl", [])
    with pytest.raises(DidiError, match="train data is empty"):
        finetune_task(str(tmp_path), str(tmp_path / "empty"), tmp_path / "out")
