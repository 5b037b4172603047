"""open_clip adapter: preset sizes, a merge of a tiny CLIP via `didi merge`, and refusals before any SVD."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from didi.artifact import load_artifact
from didi.backbones import Zoo, build_adapter
from didi.backbones.open_clip import OpenClipAdapter
from didi.cli import main
from didi.errors import DidiError
from helpers import (
    FAST_MERGE,
    OPEN_CLIP_TINY,
    check_nonmatrix_policy,
    expected_task_state,
    synthetic_finetunes,
)

TINY = OPEN_CLIP_TINY


def tiny_cfg(**vision) -> dict:
    return {**TINY, "vision_cfg": {**TINY["vision_cfg"], **vision}}


@pytest.mark.parametrize("name,params", [("ViT-B-32", 87_849_216), ("ViT-L-14", 303_966_208)])
def test_preset_scope_sizes(name, params):
    """|θ0| of the presets = every visual tensor of the architecture (counted on the meta device)."""
    import open_clip

    a = OpenClipAdapter(name)
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
    visual = {k: v for k, v in model.state_dict().items() if a.in_scope(k)}
    assert sum(v.numel() for v in visual.values()) == params
    assert (
        sum(v.numel() for v in model.visual.parameters()) == params
    )  # the scope is exactly the visual tower
    dec = [k for k, v in visual.items() if a.is_decomposed(k, tuple(v.shape), v.dtype)]
    layers = model.visual.transformer.layers
    assert len(dec) == 4 * layers + 3  # in_proj, out_proj, c_fc, c_proj per block + conv1, positional, proj
    assert a.matrix_shape("visual.conv1.weight", tuple(visual["visual.conv1.weight"].shape)) == (
        visual["visual.conv1.weight"].shape[0],
        3 * visual["visual.conv1.weight"].shape[2] ** 2,
    )
    assert a.layer_of("visual.transformer.resblocks.7.attn.in_proj_weight") == (7, "attn.in_proj_weight")
    assert a.layer_of("visual.proj") == (-1, "proj")


def _save_zoo(tmp_path, adapter, T=3):
    torch.manual_seed(0)
    model = adapter.create("cpu")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tunes = synthetic_finetunes(adapter, base, T=T)
    save_file(base, str(tmp_path / "base.safetensors"))
    for t, sd in enumerate(tunes):
        save_file(sd, str(tmp_path / f"t{t}.safetensors"))
    return base, {f"t{t}": sd for t, sd in enumerate(tunes)}


def test_merge_tiny_clip_roundtrip(tmp_path):
    """`didi merge --backbone OpenClipAdapter` on a 2-layer CLIP; task t's rebuilt model = model(θ0 + τ̃_t)."""
    adapter = OpenClipAdapter(model_config=TINY)
    base, tunes = _save_zoo(tmp_path, adapter)
    out = tmp_path / "merged"
    rc = main(
        [
            "merge",
            str(tmp_path / "base.safetensors"),
            json.dumps({t: str(tmp_path / f"{t}.safetensors") for t in tunes}),
            str(out),
            "--budget",
            "1.5",
            "--backbone",
            "OpenClipAdapter",
            "--backbone.model_config",
            json.dumps(TINY),
            "--decompose.cache_dir",
            str(tmp_path / "cache"),
            *FAST_MERGE,
        ]
    )
    assert rc == 0
    art = load_artifact(out)
    assert art.manifest["adapter"]["name"] == "open_clip"
    assert art.manifest["base_params"] == sum(v.numel() for k, v in base.items() if k.startswith("visual."))
    ranked = art.manifest["ranks"]
    assert "visual.conv1.weight" in ranked and "visual.transformer.resblocks.1.attn.in_proj_weight" in ranked
    assert not any(k.startswith("transformer.") for k in art.manifest["tensors"])  # text tower not merged
    check_nonmatrix_policy(out, adapter, base, tunes)

    rebuilt_adapter = art.adapter()  # from the manifest alone
    assert isinstance(rebuilt_adapter, OpenClipAdapter) and rebuilt_adapter.model_config == TINY
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    txt = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_out = adapter.build_model(base).encode_image(img)
        for t in tunes:
            merged = rebuilt_adapter.build_model(art.task_state_dict(t))
            dense = adapter.build_model(expected_task_state(out, t, base))
            torch.testing.assert_close(
                merged.encode_image(img), dense.encode_image(img), rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(merged.encode_text(txt), dense.encode_text(txt))  # text tower = θ0's
            tuned = adapter.build_model(tunes[t]).encode_image(img)
            # the merge moved the features toward the fine-tune (budget 1.5 covers the planted ranks)
            assert (merged.encode_image(img) - tuned).norm() < 0.5 * (base_out - tuned).norm()
    # routed serving of a mixed batch: attention (nn.MultiheadAttention) is routed, not swapped per task
    from didi.eval_image import routed_image_features
    from didi.routing import RoutedConv2d, RoutedMultiheadAttention

    feats = routed_image_features(adapter.build_model(base), art, adapter)
    layers = feats.routed.routed
    assert isinstance(layers["clip.visual.transformer.resblocks.1.attn"], RoutedMultiheadAttention)
    assert isinstance(layers["clip.visual.conv1"], RoutedConv2d)
    assert not any(".attn" in n or "conv1" in n for n in feats.routed.swapped)
    imgs = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([2, 0, 1, 0, 2])
    with torch.no_grad():
        got = feats({"pixel_values": imgs}, ids)
        for i, j in enumerate(ids.tolist()):
            model = rebuilt_adapter.build_model(art.task_state_dict(art.tasks[j]))
            ref = torch.nn.functional.normalize(model.encode_image(imgs[i : i + 1]), dim=-1)
            torch.testing.assert_close(got[i : i + 1], ref, rtol=1e-4, atol=1e-5)


def test_mismatches_refused_before_any_svd(tmp_path):
    base_a = OpenClipAdapter(model_config=TINY)
    sd = base_a.create("cpu").state_dict()
    save_file(sd, str(tmp_path / "base.safetensors"))
    cases = {
        "width": (tiny_cfg(width=48, head_width=16), "has shape"),
        "layers": (tiny_cfg(layers=3), "visual.transformer.resblocks.2"),
    }
    for label, (cfg, msg) in cases.items():
        other = {k: v for k, v in OpenClipAdapter(model_config=cfg).create("cpu").state_dict().items()}
        save_file(other, str(tmp_path / f"{label}.safetensors"))
        with pytest.raises(DidiError, match=msg) as e:
            Zoo(
                OpenClipAdapter(model_config=TINY),
                str(tmp_path / "base.safetensors"),
                {"ok": str(tmp_path / "base.safetensors"), label: str(tmp_path / f"{label}.safetensors")},
            )
        assert f"{label}.safetensors" in str(e.value)
    missing = dict(sd)
    missing.pop("visual.ln_post.bias")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(DidiError, match="visual.ln_post.bias' of custom model_config is missing"):
        Zoo(
            OpenClipAdapter(model_config=TINY),
            str(tmp_path / "base.safetensors"),
            {"a": str(tmp_path / "base.safetensors"), "b": str(tmp_path / "missing.safetensors")},
        )
    # another family: a Hugging Face-style checkpoint
    save_file(
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "llama.safetensors")
    )
    with (
        pytest.warns(UserWarning, match="given under 2 names"),
        pytest.raises(DidiError, match="not an open_clip CLIP checkpoint.*Hugging Face"),
    ):
        Zoo(
            OpenClipAdapter(model_config=TINY),
            str(tmp_path / "llama.safetensors"),
            {"a": str(tmp_path / "base.safetensors"), "b": str(tmp_path / "base.safetensors")},
        )
    # the wrong preset for the checkpoint
    with pytest.raises(DidiError, match="ViT-B-32"):
        OpenClipAdapter("ViT-B-32").open_source(tmp_path / "base.safetensors")
    with pytest.raises(DidiError, match="unknown model_name"):
        OpenClipAdapter("ViT-Q-99").expected_shapes()
    assert not (tmp_path / "cache").exists()


def test_pickle_checkpoints_need_allow_pickle(tmp_path):
    a = OpenClipAdapter(model_config=TINY)
    sd = a.create("cpu").state_dict()
    torch.save({"state_dict": sd}, tmp_path / "base.pt")
    save_file(sd, str(tmp_path / "t.safetensors"))
    save_file(sd, str(tmp_path / "u.safetensors"))
    tasks = {"a": str(tmp_path / "t.safetensors"), "b": str(tmp_path / "u.safetensors")}
    with pytest.raises(DidiError, match="pickle checkpoints can run code"):
        Zoo(a, str(tmp_path / "base.pt"), tasks)
    zoo = Zoo(a, str(tmp_path / "base.pt"), tasks, allow_pickle=True)
    assert zoo.base_params == sum(v.numel() for k, v in sd.items() if k.startswith("visual."))
    assert {p.name for p in zoo.matrices} >= {
        "visual.conv1.weight",
        "visual.proj",
        "visual.positional_embedding",
    }
    assert build_adapter("open_clip", a.settings()).settings() == a.settings()
