"""HF Llama adapter: the 3.1-8B preset on the meta device, sharded tiny merges (fp32 and bf16), refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from didi.artifact import load_artifact
from didi.backbones import Zoo
from didi.backbones.hf_llama import HFLlamaAdapter
from didi.errors import DidiError
from didi.pipeline import MergeOptions, run_merge
from helpers import check_nonmatrix_policy, expected_task_state, synthetic_finetunes, tiny_llama_config


def save_llama(path, config, state_dict=None, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.save_pretrained(str(path), max_shard_size="20KB")  # several shards + model.safetensors.index.json
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_llama_3_1_8b_preset_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        sd = LlamaForCausalLM(cfg).state_dict()
    assert sum(v.numel() for v in sd.values()) == 8_030_261_248
    a = HFLlamaAdapter("llama-3.1-8b")
    preset = a.expected_shapes()
    assert preset == {k: tuple(v.shape) for k, v in sd.items()}
    assert sum(torch.Size(s).numel() for k, s in preset.items() if a.in_scope(k)) == 8_030_261_248
    dec = {k for k, s in preset.items() if a.is_decomposed(k, s, torch.bfloat16)}
    assert len(dec) == 7 * 32 + 2 and {"model.embed_tokens.weight", "lm_head.weight"} <= dec
    assert a.layer_of("model.layers.31.mlp.down_proj.weight") == (31, "mlp.down_proj.weight")
    per_task = HFLlamaAdapter("llama-3.1-8b", embeddings="per_task")
    assert per_task.policy_of("model.embed_tokens.weight") == "per_task"
    assert per_task.policy_of("model.norm.weight") == "shared"  # norms keep their own policy
    assert {k for k, s in preset.items() if per_task.is_decomposed(k, s, torch.bfloat16)} == dec - {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
    mixed = HFLlamaAdapter("llama-3.1-8b", embeddings="shared", nonmatrix_policy="per_task")
    assert (
        mixed.policy_of("lm_head.weight") == "shared" and mixed.policy_of("model.norm.weight") == "per_task"
    )


def _zoo(tmp_path, adapter, dtype, T=3):
    cfg = tiny_llama_config()
    base = save_llama(tmp_path / "base", cfg, dtype=dtype)
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    tunes = {f"t{i}": sd for i, sd in enumerate(synthetic_finetunes(adapter, base, T=T))}
    for t, sd in tunes.items():
        save_llama(tmp_path / t, cfg, sd, dtype=dtype)
    return base, tunes


def test_merge_tiny_llama_sharded_roundtrip(tmp_path, fast):
    """fp32, embeddings low-rank: task t's rebuilt LlamaForCausalLM gives the logits of θ0 + τ̃_t."""
    dcfg, scfg, rcfg, tcfg = fast
    scfg.steps = 20
    adapter = HFLlamaAdapter(embeddings="low_rank")
    base, tunes = _zoo(tmp_path, adapter, torch.float32)
    zoo = Zoo(adapter, str(tmp_path / "base"), {t: str(tmp_path / t) for t in tunes})
    assert zoo.base_params == sum(v.numel() for v in base.values())
    assert {p.name for p in zoo.matrices} >= {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.k_proj.weight",
    }
    out = run_merge(zoo, tmp_path / "merged", MergeOptions(1.6, dcfg, scfg, rcfg, tcfg), progress=False)
    art = load_artifact(out)
    check_nonmatrix_policy(out, adapter, base, tunes)
    rebuilt = art.adapter()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_logits = adapter.build_model(base)(ids).logits
        for t in tunes:
            merged = rebuilt.build_model(art.task_state_dict(t))(ids).logits
            dense = adapter.build_model(expected_task_state(out, t, base))(ids).logits
            torch.testing.assert_close(merged, dense, rtol=1e-4, atol=1e-5)
            tuned = adapter.build_model(tunes[t])(ids).logits
            assert (merged - tuned).norm() < 0.5 * (base_logits - tuned).norm()


@pytest.mark.parametrize("shared", ["low_rank", "folded"])
def test_bf16_llama_round_trips_in_bf16(tmp_path, fast, shared):
    """bf16 sources are decomposed in fp32 and task_state_dict gives bf16 back (embeddings per task); a folded
    shared part is stored in bf16, the dtype of the base tensors it replaces."""
    dcfg, scfg, rcfg, tcfg = fast
    scfg.steps = 20
    adapter = HFLlamaAdapter(embeddings="per_task")
    base, tunes = _zoo(tmp_path, adapter, torch.bfloat16)
    zoo = Zoo(adapter, str(tmp_path / "base"), {t: str(tmp_path / t) for t in tunes})
    assert "model.embed_tokens.weight" not in {p.name for p in zoo.matrices}
    out = run_merge(
        zoo, tmp_path / "merged", MergeOptions(1.9, dcfg, scfg, rcfg, tcfg, shared=shared), progress=False
    )
    art = load_artifact(out)
    if shared == "folded":
        fold = load_file(str(out / "fold.safetensors"))
        assert {p.name for p in zoo.matrices} <= set(fold)
        assert all(fold[p.name].dtype == torch.bfloat16 for p in zoo.matrices)
    check_nonmatrix_policy(out, adapter, base, tunes)  # embeddings: each task's exact delta
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    for t in tunes:
        sd = art.task_state_dict(t)
        assert all(v.dtype == torch.bfloat16 for v in sd.values())
        exp = expected_task_state(out, t, base)
        for k, v in sd.items():  # equal up to one bf16 rounding of the fp32 sum
            torch.testing.assert_close(v.float(), exp[k], rtol=2**-7, atol=1e-6)
        # embeddings (per_task, exact) come back bit-for-bit as the fine-tune's
        assert torch.equal(sd["model.embed_tokens.weight"], tunes[t]["model.embed_tokens.weight"])
        with torch.no_grad():
            logits = art.adapter().build_model(sd)(ids).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_mismatches_refused_before_any_svd(tmp_path):
    from transformers import CLIPVisionConfig

    save_llama(tmp_path / "base", tiny_llama_config())
    save_llama(tmp_path / "vocab", tiny_llama_config(vocab=72))
    save_llama(tmp_path / "wide", tiny_llama_config(hidden=48))
    save_llama(tmp_path / "deep", tiny_llama_config(layers=3))
    from transformers import CLIPVisionModel

    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=8,
            image_size=16,
        )
    ).save_pretrained(str(tmp_path / "clip"))
    cases = {
        "vocab": "vocabulary size 72 .* differs from the base model's vocabulary size 64",
        "wide": "hidden size 48 .* differs from the base model's 32",
        "deep": "3 decoder layers, the base model has 2",
        "clip": "model_type 'clip_vision_model'",
    }
    for task, msg in cases.items():
        with pytest.raises(DidiError, match=msg) as e:
            Zoo(
                HFLlamaAdapter(),
                str(tmp_path / "base"),
                {"ok": str(tmp_path / "base"), task: str(tmp_path / task)},
            )
        assert str(tmp_path / task) in str(e.value)
    # a missing tensor inside a shard set (drop it from the index)
    (tmp_path / "missing").mkdir()
    for f in (tmp_path / "base").iterdir():
        (tmp_path / "missing" / f.name).symlink_to(f)
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "missing" / "model.safetensors.index.json").unlink()
    (tmp_path / "missing" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DidiError, match="model.layers.1.mlp.up_proj.weight' of the Llama config is missing"):
        Zoo(
            HFLlamaAdapter(),
            str(tmp_path / "base"),
            {"ok": str(tmp_path / "base"), "m": str(tmp_path / "missing")},
        )
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    torch.save(
        HFLlamaAdapter(tiny_llama_config().to_dict()).create().state_dict(),
        tmp_path / "bin" / "pytorch_model.bin",
    )
    with pytest.raises(DidiError, match="pickle checkpoints can run code"):
        HFLlamaAdapter().open_source(tmp_path / "bin")
    assert "model.norm.weight" in HFLlamaAdapter().open_source(tmp_path / "bin", allow_pickle=True)
