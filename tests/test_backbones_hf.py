"""HF CLIP adapter: same scope and decomposed inventory as open_clip, tiny merges, refusals before any SVD.

q/k/v: HF stores three (w×w) projections per layer where open_clip stores one (3w×w) `in_proj_weight`. The
adapter's `fuse_qkv=True` presents them as one matrix (rows q, k, v, exactly the in_proj layout), and then
the two inventories are identical tensor for tensor (`visual.proj` is stored transposed by HF as
`visual_projection.weight`: the same matrix, so the same ranks). With the default `fuse_qkv=False`, |θ0| and
the number of decomposed parameters are still equal, but HF has 2 more matrices per layer (3 × w×w instead
of 1 × 3w×w), which lets q, k and v get different ranks; both facts are asserted below.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from didi.artifact import load_artifact
from didi.backbones import Zoo
from didi.backbones.hf_clip import FusedQKVSource, HFClipAdapter
from didi.backbones.open_clip import OpenClipAdapter
from didi.errors import DidiError
from didi.pipeline import MergeOptions, run_merge
from didi.routing import RoutedModel
from helpers import check_nonmatrix_policy, expected_task_state, synthetic_finetunes, tiny_clip_config


def save_hf(path, config, state_dict=None, cls="CLIPModel"):
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, cls)(config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.save_pretrained(str(path))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class MetaSource:
    """Shapes and dtypes of a meta-device state dict, read like a TensorSource (no weights)."""

    def __init__(self, sd):
        self.sd, self.path = sd, "meta"

    def keys(self):
        return list(self.sd)

    def __contains__(self, k):
        return k in self.sd

    def shape(self, k):
        return tuple(self.sd[k].shape)

    def dtype(self, k):
        return self.sd[k].dtype


def to_open_clip_name(hf: str) -> str:
    """HF CLIP vision name → open_clip name (fused q/k/v = in_proj)."""
    fixed = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "visual_projection.weight": "visual.proj",
    }
    if hf in fixed:
        return fixed[hf]
    n = hf.replace("vision_model.pre_layrnorm", "visual.ln_pre").replace(
        "vision_model.post_layernorm", "visual.ln_post"
    )
    n = n.replace("vision_model.encoder.layers.", "visual.transformer.resblocks.")
    for a, b in (
        (".layer_norm1.", ".ln_1."),
        (".layer_norm2.", ".ln_2."),
        (".self_attn.qkv_proj.weight", ".attn.in_proj_weight"),
        (".self_attn.qkv_proj.bias", ".attn.in_proj_bias"),
        (".self_attn.out_proj.", ".attn.out_proj."),
        (".mlp.fc1.", ".mlp.c_fc."),
        (".mlp.fc2.", ".mlp.c_proj."),
    ):
        n = n.replace(a, b)
    return n


def inventory(adapter, src) -> dict[str, tuple]:
    """name → (shape, matrix shape or None) of every in-scope floating tensor."""
    out = {}
    for k in src.keys():
        if adapter.in_scope(k) and src.dtype(k).is_floating_point:
            s = tuple(src.shape(k))
            out[k] = (s, adapter.matrix_shape(k, s) if adapter.is_decomposed(k, s, src.dtype(k)) else None)
    return out


@pytest.mark.parametrize(
    "name,width,layers,patch,image,proj,params",
    [("ViT-B-32", 768, 12, 32, 224, 512, 87_849_216), ("ViT-L-14", 1024, 24, 14, 224, 768, 303_966_208)],
)
def test_same_scope_and_inventory_as_open_clip(name, width, layers, patch, image, proj, params):
    import open_clip
    from transformers import CLIPModel

    cfg = tiny_clip_config(width, layers, patch, image, proj, heads=width // 64)
    with torch.device("meta"):
        hf_sd = CLIPModel(cfg).state_dict()
        oc_sd = open_clip.create_model(name, pretrained=None, device="meta").state_dict()
    oc = inventory(OpenClipAdapter(name), MetaSource(oc_sd))
    hf = inventory(HFClipAdapter(cfg.to_dict()), MetaSource(hf_sd))
    fused = inventory(HFClipAdapter(cfg.to_dict(), fuse_qkv=True), FusedQKVSource(MetaSource(hf_sd)))
    count = lambda inv: sum(torch.Size(s).numel() for s, _ in inv.values())  # noqa: E731
    dec = lambda inv: sum(torch.Size(s).numel() for s, ms in inv.values() if ms)  # noqa: E731
    assert count(oc) == count(hf) == count(fused) == params
    assert dec(oc) == dec(hf) == dec(fused)
    # fused: a bijection of names with equal shapes and matrix shapes (proj transposed)
    mapped = {to_open_clip_name(k): v for k, v in fused.items()}
    assert set(mapped) == set(oc)
    for k, (shape, ms) in mapped.items():
        if k == "visual.proj":
            assert shape[::-1] == oc[k][0] and ms[::-1] == oc[k][1]
        else:
            assert (shape, ms) == oc[k], k
    ms_multiset = lambda inv: Counter(tuple(sorted(ms)) for _, ms in inv.values() if ms)  # noqa: E731
    assert ms_multiset(fused) == ms_multiset(oc)
    # unfused: 3 w×w matrices per layer instead of one 3w×w
    assert len([1 for _, ms in hf.values() if ms]) == len([1 for _, ms in oc.values() if ms]) + 2 * layers
    assert Counter(ms_multiset(hf)) - Counter(ms_multiset(oc)) == Counter({(width, width): 3 * layers})


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_merge_tiny_hf_clip_roundtrip(tmp_path, fast, fuse_qkv):
    dcfg, scfg, rcfg, tcfg = fast
    scfg.steps = 20
    cfg = tiny_clip_config()
    base = save_hf(tmp_path / "base", cfg)
    adapter = HFClipAdapter(fuse_qkv=fuse_qkv)
    tunes = {f"t{i}": sd for i, sd in enumerate(synthetic_finetunes(adapter, base))}
    for t, sd in tunes.items():
        save_hf(tmp_path / t, cfg, sd)
    zoo = Zoo(adapter, str(tmp_path / "base"), {t: str(tmp_path / t) for t in tunes})
    assert zoo.base_params == sum(v.numel() for k, v in base.items() if adapter.in_scope(k))
    names = {p.name for p in zoo.matrices}
    assert ("vision_model.encoder.layers.0.self_attn.qkv_proj.weight" in names) == fuse_qkv
    assert ("vision_model.encoder.layers.0.self_attn.q_proj.weight" in names) != fuse_qkv
    out = run_merge(zoo, tmp_path / "merged", MergeOptions(1.5, dcfg, scfg, rcfg, tcfg), progress=False)
    art = load_artifact(out)
    rebuilt = art.adapter()
    assert rebuilt.config["vision_config"]["hidden_size"] == 32 and rebuilt.fuse_qkv == fuse_qkv
    fused_base = dict(FusedQKVSource(adapter.open_source(tmp_path / "base")).items()) if fuse_qkv else base
    fused_tunes = (
        {t: dict(FusedQKVSource(adapter.open_source(tmp_path / t)).items()) for t in tunes}
        if fuse_qkv
        else tunes
    )
    check_nonmatrix_policy(out, adapter, fused_base, fused_tunes)
    pix = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in tunes:
            sd = art.task_state_dict(t)
            assert (".self_attn.qkv_proj.weight" in "".join(sd)) == fuse_qkv
            merged = rebuilt.build_model(sd).get_image_features(pixel_values=pix)
            dense = adapter.build_model(expected_task_state(out, t, fused_base)).get_image_features(
                pixel_values=pix
            )
            merged = getattr(merged, "pooler_output", merged)
            dense = getattr(dense, "pooler_output", dense)
            torch.testing.assert_close(merged, dense, rtol=1e-4, atol=1e-5)
            base_f = adapter.build_model(fused_base).get_image_features(pixel_values=pix)
            assert not torch.allclose(getattr(base_f, "pooler_output", base_f), merged)
    if fuse_qkv:
        with pytest.raises(DidiError, match="fuse_qkv=false for routed wrapping"):
            RoutedModel(ImageFeatures(adapter.build_model(fused_base)), art, adapter=rebuilt, prefix="clip")
        return
    # routed serving of a mixed batch: attention and MLP projections are routed nn.Linear layers; the position
    # embedding (looked up once for the whole batch) is swapped per task group; per-image outputs equal each
    # task's materialised model
    routed = RoutedModel(ImageFeatures(adapter.build_model(base)), art, adapter=rebuilt, prefix="clip")
    assert any(".self_attn.q_proj" in m for m in routed.routed) and "clip.visual_projection" in routed.routed
    assert set(routed.swapped) == {"vision_model.embeddings.position_embedding.weight"}
    imgs = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([1, 0, 2, 2, 0])
    with torch.no_grad():
        got = routed(imgs, task_ids=ids)
        for i, j in enumerate(ids.tolist()):
            ref = ImageFeatures(rebuilt.build_model(art.task_state_dict(art.tasks[j])))(imgs[i : i + 1])
            torch.testing.assert_close(got[i : i + 1], ref, rtol=1e-4, atol=1e-5)


class ImageFeatures(torch.nn.Module):
    """An HF CLIPModel's image features as a plain tensor (the module RoutedModel wraps, prefix "clip")."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        f = self.clip.get_image_features(pixel_values=pixel_values)
        return getattr(f, "pooler_output", f)


def test_mismatches_refused_before_any_svd(tmp_path):
    from transformers import LlamaConfig

    save_hf(tmp_path / "base", tiny_clip_config())
    save_hf(tmp_path / "wide", tiny_clip_config(width=48, heads=2))
    save_hf(tmp_path / "deep", tiny_clip_config(layers=3))
    save_hf(
        tmp_path / "vision_only", tiny_clip_config().vision_config, cls="CLIPVisionModel"
    )  # no projection
    save_hf(
        tmp_path / "llama",
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        cls="LlamaForCausalLM",
    )
    cases = {
        "wide": "has shape \\[48",
        "deep": "encoder.layers.2.* is not part of the model",
        "vision_only": "visual_projection.weight' is missing",
        "llama": "model_type 'llama'",
    }
    for task, msg in cases.items():
        with pytest.raises(DidiError, match=msg) as e:
            Zoo(
                HFClipAdapter(),
                str(tmp_path / "base"),
                {"ok": str(tmp_path / "base"), task: str(tmp_path / task)},
            )
        assert str(tmp_path / task) in str(e.value)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(tiny_clip_config().to_dict()))
    torch.save(
        base := HFClipAdapter(tiny_clip_config().to_dict()).create().state_dict(),
        tmp_path / "bin" / "pytorch_model.bin",
    )
    with pytest.raises(DidiError, match="pickle checkpoints can run code"):
        HFClipAdapter().open_source(tmp_path / "bin")
    src = HFClipAdapter().open_source(tmp_path / "bin", allow_pickle=True)
    assert set(src.keys()) == set(base)


def test_vision_model_files_of_both_transformers_generations(tmp_path):
    """A transformers-5 `CLIPVisionModel` file (no `vision_model.` prefix) and a 4.x-style one (prefixed) are
    the same checkpoint to the adapter, and build_model loads either name style."""
    from safetensors.torch import save_file

    cfg = tiny_clip_config().vision_config
    v5 = save_hf(tmp_path / "v5", cfg, cls="CLIPVisionModel")
    assert not any(k.startswith("vision_model.") for k in v5)
    (tmp_path / "v4").mkdir()
    (tmp_path / "v4" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    save_file({f"vision_model.{k}": v for k, v in v5.items()}, str(tmp_path / "v4" / "model.safetensors"))
    zoo = Zoo(HFClipAdapter(), str(tmp_path / "v5"), {"a": str(tmp_path / "v4"), "b": str(tmp_path / "v5")})
    assert zoo.base_params == sum(v.numel() for v in v5.values())
    assert all(p.name.startswith("vision_model.") for p in zoo.plan)
    a = HFClipAdapter()
    sd = dict(a.open_source(tmp_path / "v5").items())
    pix = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            a.build_model(sd)(pixel_values=pix).pooler_output,
            a.build_model(v5)(pixel_values=pix).pooler_output,
        )
