"""`didi export`: PEFT adapters that `peft` loads give the task models' outputs; checkpoints equal
`Artifact.task_state_dict` bit for bit in the base's own layout (shards, index, config); refusals by name.

Artifacts are written by hand with `write_artifact` (every term kind, groups, rank-0 modules) so each case is
exact; one test exports an artifact made by the real `didi merge` pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from didi.artifact import load_artifact, write_artifact
from didi.cli import main
from didi.errors import DidiError
from didi.export import export_artifact
from helpers import tiny_llama_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora(m: int, n: int, r: int, seed: int, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = _g(seed)
    return scale * torch.randn(m, r, generator=g), scale * torch.randn(r, n, generator=g) / n**0.5


def make_artifact(
    path: Path,
    base_dir: Path,
    adapter,
    base_sd: dict,
    fold: dict,
    shared: dict,
    tasks: dict,
    groups: dict | None = None,
) -> Path:
    """A hand-made artifact over `base_sd` (terms given as {name: tensor} per file)."""
    tensors = {
        k: {
            "shape": list(v.shape),
            "dtype": str(v.dtype).replace("torch.", ""),
            "matrix_shape": list(v.shape) if v.ndim == 2 else None,
        }
        for k, v in base_sd.items()
        if v.dtype.is_floating_point and adapter.in_scope(k)
    }
    manifest = {
        "method": {"name": "handmade"},
        "adapter": {"name": adapter.registry_name, "settings": adapter.settings()},
        "sources": {"base": {"path": str(base_dir)}},
        "tasks": list(tasks),
        "base_params": sum(base_sd[k].numel() for k in tensors),
        "tensors": tensors,
    }
    return write_artifact(path, manifest, fold, shared, tasks, groups=groups)


def put(terms: dict, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    terms[f"{name}::lora_A"], terms[f"{name}::lora_B"] = A, B


# ------------------------------------------------------------------------------------------- tiny Llama
@pytest.fixture
def llama(tmp_path):
    from transformers import LlamaForCausalLM

    from didi.backbones.hf_llama import HFLlamaAdapter

    tmp_path = tmp_path / "llama"
    cfg = tiny_llama_config()
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "base"), max_shard_size="20KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    adapter = HFLlamaAdapter()
    src = adapter.open_source(tmp_path / "base")
    base_sd = dict(src.items())
    q0, v1, dn1 = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    )
    emb, o1 = "model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"
    fold = {"model.norm.weight": 0.1 * torch.randn(32, generator=_g(1))}
    shared = {f"{o1}::dense": 0.05 * torch.randn(32, 32, generator=_g(2))}
    put(shared, q0, *lora(32, 32, 2, 3))
    t0, t1, t2, grp = {}, {}, {}, {}
    put(t0, q0, *lora(32, 32, 2, 4))
    put(t0, v1, *lora(16, 32, 3, 5))
    put(t0, emb, *lora(64, 32, 2, 6))
    put(t1, dn1, *lora(32, 64, 1, 7))  # every other module: rank 0 for t1
    put(grp, q0, *lora(32, 32, 1, 8))  # a group term of t0 and t1, concatenated with their own factors
    art = make_artifact(
        tmp_path / "art",
        tmp_path / "base",
        adapter,
        base_sd,
        fold,
        shared,
        {"t0": t0, "t1": t1, "t2": t2},
        groups={"g": (["t0", "t1"], grp)},
    )
    return art, adapter, tmp_path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_export_llama_matches_task_models(llama):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    art_path, adapter, tmp = llama
    out = export_artifact(art_path, tmp / "peft", format="peft")
    art = load_artifact(art_path)
    info = json.loads((out / "export.json").read_text())
    assert info["tasks"] == {"t0": "adapters/t0", "t1": "adapters/t1", "t2": None}
    cfg0 = json.loads((out / "adapters" / "t0" / "adapter_config.json").read_text())
    assert sorted(cfg0["target_modules"]) == [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert cfg0["r"] == cfg0["lora_alpha"] == 3  # q_proj: own 2 + group 1; v_proj 3; embeddings 2
    assert cfg0["rank_pattern"] == cfg0["alpha_pattern"] == {r"model\.embed_tokens": 2}
    cfg1 = json.loads((out / "adapters" / "t1" / "adapter_config.json").read_text())
    assert sorted(cfg1["target_modules"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert (out / "base" / "model.safetensors.index.json").exists() and (
        out / "base" / "config.json"
    ).exists()

    ids = torch.randint(0, 64, (2, 9), generator=_g(11))
    base_logits = _logits(LlamaForCausalLM.from_pretrained(str(out / "base")), ids)
    for t in ("t0", "t1"):
        expected = _logits(adapter.build_model(art.task_state_dict(t)), ids)
        model = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(str(out / "base")), str(out / "adapters" / t)
        ).eval()
        got = _logits(model, ids)
        assert (expected - base_logits).abs().max() > 1e-3  # the expert changes the outputs (≫ atol)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        merged = model.merge_and_unload()  # PEFT's own weight arithmetic gives the same weights
        sd = art.task_state_dict(t)
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(v, sd[k], rtol=1e-5, atol=1e-6)
    # a task with no expert at all is the exported base itself
    torch.testing.assert_close(
        base_logits, _logits(adapter.build_model(art.task_state_dict("t2")), ids), rtol=1e-5, atol=1e-6
    )


def test_checkpoint_export_llama_sharded_is_exact(llama):
    from transformers import LlamaForCausalLM

    art_path, adapter, tmp = llama
    out = export_artifact(art_path, tmp / "ckpt", format="checkpoint", tasks=["t0", "t2"])
    art = load_artifact(art_path)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "t0", "t2"]
    base_index = json.loads((tmp / "base" / "model.safetensors.index.json").read_text())
    for t in ("t0", "t2"):
        d = out / t
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == base_index["weight_map"]  # same shards, same tensor placement
        assert json.loads((d / "config.json").read_text()) == json.loads(
            (tmp / "base" / "config.json").read_text()
        )
        written = {}
        for shard in set(index["weight_map"].values()):
            written.update(load_file(str(d / shard)))
        expected = art.task_state_dict(t)
        assert written.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(written[k], v), k
        model = LlamaForCausalLM.from_pretrained(str(d))  # transformers reads it as a normal checkpoint
        ids = torch.randint(0, 64, (1, 5), generator=_g(1))
        torch.testing.assert_close(_logits(model, ids), _logits(adapter.build_model(expected), ids))


# ------------------------------------------------------------------------------------------ tiny BERT
def test_peft_export_bert(tmp_path):
    from peft import PeftModel
    from transformers import BertConfig, BertModel

    from didi.backbones.hf_encoder import HFEncoderAdapter

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    BertModel(cfg).save_pretrained(str(tmp_path / "base"))
    adapter = HFEncoderAdapter()
    base_sd = dict(adapter.open_source(tmp_path / "base").items())
    q, inter = "encoder.layer.0.attention.self.query.weight", "encoder.layer.1.intermediate.dense.weight"
    shared, ta, tb = {}, {}, {}
    put(shared, q, *lora(32, 32, 1, 1))
    put(ta, q, *lora(32, 32, 2, 2))
    put(ta, inter, *lora(64, 32, 4, 3))
    put(tb, inter, *lora(64, 32, 1, 4))
    art_path = make_artifact(
        tmp_path / "art", tmp_path / "base", adapter, base_sd, {}, shared, {"a": ta, "b": tb}
    )
    out = export_artifact(art_path, tmp_path / "peft", format="peft")
    art = load_artifact(art_path)
    ids = torch.randint(0, 50, (2, 7), generator=_g(5))
    for t in ("a", "b"):
        with torch.no_grad():
            expected = adapter.build_model(art.task_state_dict(t))(input_ids=ids).last_hidden_state
            model = PeftModel.from_pretrained(
                BertModel.from_pretrained(str(out / "base")), str(out / "adapters" / t)
            )
            got = model.eval()(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- refusals, CLI
@pytest.fixture
def generic_artifact(tmp_path):
    """Generic state-dict adapter, single-file base; a dense task term and a mask term (baselines' kinds)."""
    from safetensors.torch import save_file

    from didi.backbones import Adapter

    g = _g(0)
    base_sd = {
        "blocks.0.fc.weight": torch.randn(8, 6, generator=g),
        "blocks.0.fc.bias": torch.randn(8, generator=g),
        "blocks.1.fc.weight": torch.randn(6, 8, generator=g),
    }
    save_file(base_sd, str(tmp_path / "base.safetensors"))
    w0, w1 = "blocks.0.fc.weight", "blocks.1.fc.weight"
    shared = {f"{w1}::ref": torch.randn(6, 8, generator=g)}
    put(shared, w0, *lora(8, 6, 1, 1))
    a = {f"{w1}::mask": (torch.rand(6, 8, generator=g) > 0.5).float(), f"{w1}::scale": torch.tensor(0.7)}
    put(a, w0, *lora(8, 6, 2, 2))
    b = {"blocks.0.fc.bias::dense": torch.randn(8, generator=g)}
    art = make_artifact(
        tmp_path / "art",
        tmp_path / "base.safetensors",
        Adapter(),
        base_sd,
        {w1: 0.1 * torch.randn(6, 8, generator=g)},
        shared,
        {"a": a, "b": b},
    )
    return art, tmp_path


def test_checkpoint_export_single_file_with_mask_and_dense_terms(generic_artifact):
    art_path, tmp = generic_artifact
    out = export_artifact(art_path, tmp / "ckpt")
    art = load_artifact(art_path)
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors", "export.json"]
    for t in ("a", "b"):
        written, expected = load_file(str(out / f"{t}.safetensors")), art.task_state_dict(t)
        assert written.keys() == expected.keys()
        assert all(torch.equal(written[k], v) for k, v in expected.items())
    # the independent formula for task a's masked tensor
    base = load_file(str(tmp / "base.safetensors"))
    fold, shared = (
        load_file(str(art_path / "fold.safetensors")),
        load_file(str(art_path / "shared.safetensors")),
    )
    own = load_file(str(art_path / "tasks" / "a.safetensors"))
    w1 = "blocks.1.fc.weight"
    literal = base[w1] + fold[w1] + own[f"{w1}::scale"] * own[f"{w1}::mask"] * shared[f"{w1}::ref"]
    torch.testing.assert_close(load_file(str(out / "a.safetensors"))[w1], literal)


def test_peft_refusals_name_the_tensor_and_leave_nothing(generic_artifact, llama):
    art_path, tmp = generic_artifact
    with pytest.raises(DidiError, match="no model architecture"):
        export_artifact(art_path, tmp / "p1", format="peft")
    assert not (tmp / "p1").exists()
    # a Llama artifact whose task stores a dense term: refused, naming the tensor and the term
    art_l, adapter, tmp_l = llama
    bad = dict(load_file(str(art_l / "tasks" / "t1.safetensors")))
    bad["model.layers.0.mlp.up_proj.weight::dense"] = torch.zeros(64, 32)
    base_sd = dict(adapter.open_source(tmp_l / "base").items())
    bad_art = make_artifact(tmp_l / "bad", tmp_l / "base", adapter, base_sd, {}, {}, {"t0": {}, "t1": bad})
    with pytest.raises(DidiError, match=r"'dense' term for tensor 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        export_artifact(bad_art, tmp_l / "p2", format="peft")
    assert not (tmp_l / "p2").exists()
    with pytest.raises(DidiError, match="unknown task 'zz'"):
        export_artifact(art_path, tmp / "p3", tasks=["zz"])
    (tmp / "exists").mkdir()
    with pytest.raises(DidiError, match="already exists"):
        export_artifact(art_path, tmp / "exists")


def test_cli_export(generic_artifact, capsys):
    art_path, tmp = generic_artifact
    assert (
        main(["export", str(art_path), str(tmp / "cli_out"), "--format", "checkpoint", "--tasks", "[b]"]) == 0
    )
    assert sorted(p.name for p in (tmp / "cli_out").iterdir()) == ["b.safetensors", "export.json"]
    assert "b.safetensors" in capsys.readouterr().out
    assert main(["export", str(art_path), str(tmp / "cli_peft"), "--format", "peft"]) == 2
    assert "no model architecture" in capsys.readouterr().err


def test_checkpoint_export_of_a_real_merge(tiny_zoo, fast, tmp_path):
    """An artifact from the real pipeline (generic adapter, synthetic zoo) exports to its task weights."""
    from didi.backbones import Adapter, Zoo
    from didi.pipeline import MergeOptions, run_merge

    dcfg, scfg, rcfg, tcfg = fast
    base, tasks = tiny_zoo
    art_path = run_merge(
        Zoo(Adapter(), base, tasks),
        tmp_path / "merged",
        MergeOptions(1.5, dcfg, scfg, rcfg, tcfg),
        progress=False,
    )
    out = export_artifact(art_path, tmp_path / "ckpt")
    art = load_artifact(art_path)
    for t in art.tasks:
        written, expected = load_file(str(out / f"{t}.safetensors")), art.task_state_dict(t)
        assert written.keys() == expected.keys() and all(
            torch.equal(written[k], v) for k, v in expected.items()
        )


def test_checkpoint_export_hf_clip_fused_and_renamed_names(tmp_path):
    """hf_clip with fuse_qkv on a transformers-5 file (no `vision_model.` prefix): the export is written under
    the checkpoint's own names (q/k/v split back, prefix dropped) and transformers loads it as the task
    model."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from didi.backbones.hf_clip import HFClipAdapter

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=8,
        image_size=16,
    )
    CLIPVisionModel(cfg).save_pretrained(str(tmp_path / "base"))
    raw = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in raw)
    adapter = HFClipAdapter(fuse_qkv=True)
    base_sd = dict(adapter.open_source(tmp_path / "base").items())
    qkv, fc1 = (
        "vision_model.encoder.layers.0.self_attn.qkv_proj.weight",
        "vision_model.encoder.layers.1.mlp.fc1.weight",
    )
    assert base_sd[qkv].shape == (96, 32)
    shared, a = {}, {}
    put(shared, qkv, *lora(96, 32, 2, 1))
    put(a, qkv, *lora(96, 32, 3, 2))
    put(a, fc1, *lora(64, 32, 2, 3))
    art_path = make_artifact(
        tmp_path / "art", tmp_path / "base", adapter, base_sd, {}, shared, {"a": a, "b": {}}
    )
    out = export_artifact(art_path, tmp_path / "ckpt")
    art = load_artifact(art_path)
    written = load_file(str(out / "a" / "model.safetensors"))
    assert written.keys() == raw.keys()
    expected = art.task_state_dict("a")
    q, k, v = expected[qkv].chunk(3)
    assert torch.equal(written["encoder.layers.0.self_attn.k_proj.weight"], k)
    assert not torch.equal(
        written["encoder.layers.0.self_attn.k_proj.weight"], raw["encoder.layers.0.self_attn.k_proj.weight"]
    )
    pix = torch.randn(2, 3, 16, 16, generator=_g(4))
    with torch.no_grad():
        got = CLIPVisionModel.from_pretrained(str(out / "a"))(pixel_values=pix).pooler_output
        want = adapter.build_model(expected)(pixel_values=pix).pooler_output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(DidiError, match="fused q/k/v"):
        export_artifact(art_path, tmp_path / "peft", format="peft")
