"""Components (issue 13, MERGE): every adapter assigns each tensor of its tiny model a component — per layer
`attn` / `mlp` (norms and biases follow their component), `embed` and `head` — the generic adapter falls back
to one component per layer prefix, and `didi backbones --components NAME` lists them."""

from __future__ import annotations

import re

import pytest
import torch

from didi.backbones import Adapter, build_adapter
from didi.backbones.hf_clip import HFClipAdapter
from didi.backbones.hf_encoder import HFEncoderAdapter
from didi.backbones.hf_llama import HFLlamaAdapter
from didi.backbones.open_clip import OpenClipAdapter
from didi.cli import main
from helpers import OPEN_CLIP_TINY, tiny_bert_config, tiny_clip_config, tiny_llama_config


def tiny(family: str) -> tuple[Adapter, list[str]]:
    """The adapter and the in-scope tensor names of the tiny model the backbone tests build."""
    if family == "open_clip":
        a = OpenClipAdapter(model_config=OPEN_CLIP_TINY)
        sd = a.create("meta").state_dict()
    elif family == "hf_clip":
        a = HFClipAdapter(config=tiny_clip_config().to_dict())
        sd = {k: None for k in a.expected_shapes()}
    elif family == "hf_llama":
        a = HFLlamaAdapter(config=tiny_llama_config().to_dict())
        sd = a.expected_shapes()
    else:
        from transformers import BertModel

        a = HFEncoderAdapter(model_config=tiny_bert_config().to_dict())
        with torch.device("meta"):
            sd = BertModel(tiny_bert_config()).state_dict()
    return a, [k for k in sd if a.in_scope(k)]


#: family → {tensor: component}, at least one norm per family
EXPECTED = {
    "open_clip": {
        "visual.transformer.resblocks.0.attn.in_proj_weight": "layer.0.attn",
        "visual.transformer.resblocks.1.attn.out_proj.bias": "layer.1.attn",
        "visual.transformer.resblocks.0.ln_1.weight": "layer.0.attn",
        "visual.transformer.resblocks.1.mlp.c_fc.weight": "layer.1.mlp",
        "visual.transformer.resblocks.1.ln_2.bias": "layer.1.mlp",
        "visual.conv1.weight": "embed",
        "visual.class_embedding": "embed",
        "visual.positional_embedding": "embed",
        "visual.ln_pre.weight": "embed",
        "visual.ln_post.weight": "head",
        "visual.proj": "head",
    },
    "hf_clip": {
        "vision_model.encoder.layers.0.self_attn.q_proj.weight": "layer.0.attn",
        "vision_model.encoder.layers.1.self_attn.out_proj.bias": "layer.1.attn",
        "vision_model.encoder.layers.0.layer_norm1.weight": "layer.0.attn",
        "vision_model.encoder.layers.1.mlp.fc2.weight": "layer.1.mlp",
        "vision_model.encoder.layers.1.layer_norm2.bias": "layer.1.mlp",
        "vision_model.embeddings.patch_embedding.weight": "embed",
        "vision_model.embeddings.class_embedding": "embed",
        "vision_model.pre_layrnorm.weight": "embed",
        "vision_model.post_layernorm.weight": "head",
        "visual_projection.weight": "head",
    },
    "hf_llama": {
        "model.layers.0.self_attn.q_proj.weight": "layer.0.attn",
        "model.layers.1.self_attn.o_proj.weight": "layer.1.attn",
        "model.layers.0.input_layernorm.weight": "layer.0.attn",
        "model.layers.1.mlp.down_proj.weight": "layer.1.mlp",
        "model.layers.1.post_attention_layernorm.weight": "layer.1.mlp",
        "model.embed_tokens.weight": "embed",
        "model.norm.weight": "head",
        "lm_head.weight": "head",
    },
    "hf_encoder": {
        "encoder.layer.0.attention.self.query.weight": "layer.0.attn",
        "encoder.layer.1.attention.output.dense.bias": "layer.1.attn",
        "encoder.layer.0.attention.output.LayerNorm.weight": "layer.0.attn",
        "encoder.layer.1.intermediate.dense.weight": "layer.1.mlp",
        "encoder.layer.1.output.dense.weight": "layer.1.mlp",
        "encoder.layer.0.output.LayerNorm.bias": "layer.0.mlp",
        "embeddings.word_embeddings.weight": "embed",
        "embeddings.LayerNorm.weight": "embed",
        "pooler.dense.weight": "head",
    },
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_every_tensor_has_a_component(family):
    a, names = tiny(family)
    comps = a.components(names)
    assert sorted(n for ns in comps.values() for n in ns) == sorted(names)  # each tensor exactly once
    assert [n for ns in comps.values() for n in ns if n in names]  # not empty
    for n, c in EXPECTED[family].items():
        assert n in names, n
        assert a.component_of(n) == c, (n, a.component_of(n))
    # exactly attn and mlp per layer (nothing left at layer level), plus embed and head
    assert set(comps) == {f"layer.{i}.{p}" for i in range(2) for p in ("attn", "mlp")} | {"embed", "head"}
    # the order of `components`: that of the tensors
    first = {c: names.index(ns[0]) for c, ns in comps.items()}
    assert list(comps) == sorted(comps, key=first.get)
    for ns in comps.values():
        assert ns == sorted(ns, key=names.index)


def test_registry_covers_every_adapter():
    """Every adapter didi ships is covered above (adapters that tests register, such as the custom-adapter
    example's, come from other modules and are left out)."""
    from didi.backbones import ADAPTERS

    shipped = {name for name, cls in ADAPTERS.items() if cls.__module__.startswith("didi.backbones.")}
    assert shipped == {"state_dict", *EXPECTED}


def test_generic_adapter_one_component_per_layer_prefix():
    a = build_adapter("state_dict")
    names = [
        "embed.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.norm.bias",
        "head.weight",
        "head.bias",
    ]
    assert a.components(names) == {
        "embed": ["embed.weight"],
        "layer.0": ["blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight"],
        "layer.1": ["blocks.1.attn.qkv.weight", "blocks.1.norm.bias"],
        "head": ["head.weight", "head.bias"],
    }
    assert a.listing_shapes() is None


def test_out_of_scope_tensors_fall_back_to_their_first_segment():
    a = OpenClipAdapter(model_config=OPEN_CLIP_TINY)  # the text tower is not merged: no per-layer split
    assert a.component_of("transformer.resblocks.0.attn.in_proj_weight") == "transformer"
    assert a.component_of("logit_scale") == "logit_scale"


def test_cli_lists_components(capsys):
    assert main(["backbones", "--components", "open_clip"]) == 0
    out = capsys.readouterr().out
    assert "attn" in out and "mlp" in out and "embed" in out and "head" in out
    assert re.search(r"layer\.0\.\.11: attn \(6 tensors", out)  # ViT-B-32's 12 blocks in one line


@pytest.mark.parametrize("name", ["state_dict", "hf_encoder"])
def test_cli_prints_the_rule_without_a_checkpoint(capsys, name):
    assert main(["backbones", "--components", name]) == 0
    assert "rule" in capsys.readouterr().out


def test_cli_unknown_adapter(capsys):
    assert main(["backbones", "--components", "nope"]) == 2


def test_fused_qkv_and_listing_shapes_follow_the_config():
    a = HFClipAdapter(config=tiny_clip_config().to_dict(), fuse_qkv=True)
    assert a.component_of("vision_model.encoder.layers.1.self_attn.qkv_proj.weight") == "layer.1.attn"
    assert a.component_of("encoder.layers.0.mlp.fc1.bias") == "layer.0.mlp"  # unprefixed CLIPVisionModel file
    assert HFClipAdapter().listing_shapes() is None
    enc = HFEncoderAdapter(model_config=tiny_bert_config().to_dict())
    assert set(enc.components(enc.listing_shapes())) == set(enc.components(tiny("hf_encoder")[1]))
