"""Image classification evaluation: a tiny open_clip model, PNG files in ImageFolder layout, zero-shot heads
from the text tower; routed per-task accuracy equals a literal per-image computation with each task's own
model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from didi.artifact import load_artifact, write_artifact
from didi.backbones.open_clip import OpenClipAdapter
from didi.datamodules.image import (
    ImageClassificationDataModule,
    classnames_of,
    open_clip_transform,
)
from didi.errors import DidiError
from didi.eval_image import open_clip_tokenizer, routed_image_features, zero_shot_head
from didi.evaluators import run_evaluation
from didi.trainer import TrainerConfig

# text vocabulary of open_clip's BPE tokenizer (49408) so the real tokenizer can be used; towers stay tiny
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CPU1 = TrainerConfig(accelerator="cpu", devices=1, logger="none", progress_bar=False)
CLASSES = {"cars": ["red_car", "blue_car", "green_car"], "dtd": ["striped", "dotted"]}


def _png(path, g):
    from PIL import Image

    arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("img")
    adapter = OpenClipAdapter(model_config=TINY)
    torch.manual_seed(0)
    base_sd = {k: v.detach().clone() for k, v in adapter.create("cpu").state_dict().items()}
    save_file(base_sd, str(root / "base.safetensors"))
    g = torch.Generator().manual_seed(1)
    data = {}
    for t, classes in CLASSES.items():
        for c in classes:
            for i in range(int(torch.randint(1, 4, (1,), generator=g))):
                _png(root / "data" / t / "test" / c / f"{i}.png", g)
        data[t] = str(root / "data" / t)
    fc, proj = (
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "visual.transformer.resblocks.1.attn.out_proj.weight",
    )
    tensors = {
        k: {"shape": list(v.shape), "dtype": "float32", "matrix_shape": None}
        for k, v in base_sd.items()
        if adapter.in_scope(k)
    }

    def pair(name, m, n, r, scale=1.0):
        return {
            f"{name}::lora_A": scale * torch.randn(m, r, generator=g),
            f"{name}::lora_B": torch.randn(r, n, generator=g),
        }

    shared = pair(fc, 128, 32, 2, 0.5)
    tasks = {
        "cars": pair(fc, 128, 32, 3),
        "dtd": {**pair(proj, 32, 32, 2), "visual.ln_post.weight::dense": 0.5 * torch.randn(32, generator=g)},
    }
    manifest = {
        "method": {"name": "handmade"},
        "adapter": {"name": "open_clip", "settings": adapter.settings()},
        "sources": {"base": {"path": str(root / "base.safetensors")}},
        "tasks": list(tasks),
        "base_params": sum(base_sd[k].numel() for k in tensors),
        "tensors": tensors,
    }
    art = write_artifact(root / "art", manifest, {}, shared, tasks)
    return {"root": root, "adapter": adapter, "base_sd": base_sd, "data": data, "art": art}


def test_zero_shot_head_is_the_prompt_ensemble(setup):
    adapter = setup["adapter"]
    clip = adapter.build_model(setup["base_sd"])
    tok = open_clip_tokenizer(adapter)
    templates = ["a photo of a {}.", "a blurry photo of the {}."]
    names = classnames_of(setup["data"]["cars"])
    assert names == ["blue car", "green car", "red car"]  # sorted folders, '_' read as a space
    head = zero_shot_head(clip, tok, names, templates)
    with torch.no_grad():
        for c, row in zip(names, head.weight):
            embs = [F.normalize(clip.encode_text(tok([tpl.format(c)]))[0], dim=0) for tpl in templates]
            literal = F.normalize(sum(embs) / len(embs), dim=0) * clip.logit_scale.exp()
            torch.testing.assert_close(row, literal, rtol=1e-5, atol=1e-6)
    with pytest.raises(DidiError, match="template"):
        zero_shot_head(clip, tok, names, ["no placeholder"])


def test_routed_image_accuracy_matches_literal(setup):
    from torchvision.datasets.folder import default_loader

    s = setup
    adapter, art = s["adapter"], load_artifact(s["art"])
    base_clip = adapter.build_model(s["base_sd"])
    transform = open_clip_transform(base_clip)
    tok = open_clip_tokenizer(adapter)
    heads = {t: zero_shot_head(base_clip, tok, classnames_of(d)) for t, d in s["data"].items()}
    dm = ImageClassificationDataModule(
        s["data"],
        transform,
        task_order=art.tasks,
        batch_size=3,
        num_classes={t: h.out_features for t, h in heads.items()},
    )
    feats = routed_image_features(adapter.build_model(s["base_sd"]), art, adapter)
    res = run_evaluation(feats, heads, art.tasks, dm, CPU1)
    from torchvision.datasets import ImageFolder

    for t, d in s["data"].items():
        model = adapter.build_model(art.task_state_dict(t))
        folder = ImageFolder(f"{d}/test")
        correct = 0
        with torch.no_grad():
            for path, label in folder.samples:
                x = transform(default_loader(path)).unsqueeze(0)
                logits = heads[t](F.normalize(model.encode_image(x), dim=-1))[0]
                correct += int(logits.argmax().item() == label)
        assert res[t]["n"] == len(folder.samples)
        assert res[t]["accuracy"] == pytest.approx(correct / len(folder.samples))
    # the experts matter: θ0's features differ from each task's
    x = transform(default_loader(ImageFolder(f"{s['data']['dtd']}/test").samples[0][0])).unsqueeze(0)
    with torch.no_grad():
        f_task = adapter.build_model(art.task_state_dict("dtd")).encode_image(x)
        f_base = base_clip.encode_image(x)
        f_routed = feats(dict(pixel_values=x), torch.tensor([art.tasks.index("dtd")]))
    assert (f_task - f_base).abs().max() > 1e-3
    torch.testing.assert_close(f_routed, F.normalize(f_task, dim=-1), rtol=1e-4, atol=1e-5)


def test_image_data_refusals(setup, tmp_path):
    s = setup
    with pytest.raises(DidiError, match="not one of the model's tasks"):
        ImageClassificationDataModule({"zz": s["data"]["cars"]}, lambda x: x, task_order=["cars", "dtd"])
    with pytest.raises(DidiError, match="3 class folders, the head has 2"):
        ImageClassificationDataModule(
            {"cars": s["data"]["cars"]}, lambda x: x, num_classes={"cars": 2}
        ).setup()
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DidiError, match="ImageFolder"):
        ImageClassificationDataModule({"cars": str(tmp_path / "empty")}, lambda x: x).setup()


def test_evaluate_artifact_images_zero_shot_and_given_heads(setup, tmp_path):
    """`didi evaluate` on an open_clip artifact: zero-shot heads by default, a given head file if passed."""
    from safetensors.torch import save_file

    from didi.cli import main

    s = setup
    adapter, art = s["adapter"], load_artifact(s["art"])
    base_clip = adapter.build_model(s["base_sd"])
    tok = open_clip_tokenizer(adapter)
    heads = {t: zero_shot_head(base_clip, tok, classnames_of(d)) for t, d in s["data"].items()}
    dm = ImageClassificationDataModule(
        s["data"], open_clip_transform(base_clip), task_order=art.tasks, batch_size=4
    )
    direct = run_evaluation(
        routed_image_features(adapter.build_model(s["base_sd"]), art, adapter), heads, art.tasks, dm, CPU1
    )
    data = json.dumps(s["data"])
    assert (
        main(
            [
                "evaluate",
                str(s["art"]),
                data,
                "--output",
                str(tmp_path / "rep"),
                "--batch_size",
                "4",
                "--trainer.accelerator",
                "cpu",
                "--trainer.progress_bar",
                "false",
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {t: (v["accuracy"], v["n"]) for t, v in rep["tasks"].items()} == {
        t: (v["accuracy"], v["n"]) for t, v in direct.items()
    }
    # a given head (here: the reversed class order of the zero-shot head) replaces the zero-shot one
    W = heads["dtd"].weight.detach().flip(0).contiguous()
    save_file({"weight": W}, str(tmp_path / "dtd_head.safetensors"))
    from didi.evaluate import evaluate_artifact

    rep2 = evaluate_artifact(
        s["art"],
        {"dtd": s["data"]["dtd"]},
        heads={"dtd": str(tmp_path / "dtd_head.safetensors")},
        batch_size=4,
        trainer=CPU1,
    )
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import default_loader

    model, transform = adapter.build_model(art.task_state_dict("dtd")), open_clip_transform(base_clip)
    samples = ImageFolder(f"{s['data']['dtd']}/test").samples
    with torch.no_grad():
        correct = sum(
            int(
                (F.normalize(model.encode_image(transform(default_loader(p)).unsqueeze(0)), dim=-1) @ W.T)
                .argmax()
                .item()
                == y
            )
            for p, y in samples
        )
    assert rep2["tasks"]["dtd"] == {"accuracy": pytest.approx(correct / len(samples)), "n": len(samples)}
