"""The docs/custom_adapter.md subclassing example, verbatim, registered and merged with 3 synthetic tasks."""

from __future__ import annotations

import re
from pathlib import Path

import torch

# --- example: begin
import torch.nn as nn
from safetensors.torch import save_file

from didi.backbones import Adapter, register_adapter


class TinyConvFormer(nn.Module):
    """A family didi does not ship: a conv patch stem, `depth` pre-norm blocks, a linear head."""

    def __init__(self, width: int = 16, depth: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(width),
                    "mix": nn.Linear(width, width),
                    "up": nn.Linear(width, 2 * width),
                    "down": nn.Linear(2 * width, width),
                }
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(2).transpose(1, 2)  # (batch, patches, width)
        for b in self.blocks:
            z = b["norm"](h)
            h = h + b["mix"](z) + b["down"](torch.relu(b["up"](z)))
        return self.head(h.mean(1))


@register_adapter("tiny_convformer")
class TinyConvFormerAdapter(Adapter):
    """TinyConvFormer checkpoints: blocks and stem merged; the task-specific head is left out of the scope.

    Args:
        width: channels of the stem and the blocks.
        depth: number of blocks.
        classes: classes of the head (needed to rebuild the model).
        include, exclude, nonmatrix_policy: as for every adapter.
    """

    def __init__(
        self,
        width: int = 16,
        depth: int = 2,
        classes: int = 5,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        nonmatrix_policy: str = "shared",
    ) -> None:
        super().__init__(include, exclude, nonmatrix_policy)
        self.width, self.depth, self.classes = width, depth, classes

    def in_scope(self, name: str) -> bool:  # what |θ0| counts and what is merged
        return not name.startswith("head.")

    def is_decomposed(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        # 2-D weights and the 4-D stem kernel; the base class's matrix_shape reshapes (out, in, kh, kw)
        # to (out, in·kh·kw), and its layer_of already reads "blocks.<i>." for the rank plots.
        return dtype.is_floating_point and len(shape) in (2, 4) and self._pattern_ok(name)

    def build_model(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        model = TinyConvFormer(self.width, self.depth, self.classes)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def settings(self) -> dict:  # recorded in the manifest: the artifact alone rebuilds the adapter
        return {**super().settings(), "width": self.width, "depth": self.depth, "classes": self.classes}


def write_zoo(root: Path, tasks: int = 3) -> None:
    """θ0 and `tasks` synthetic fine-tunes (low-rank deltas on matrices, small ones on biases and norms)."""
    torch.manual_seed(0)
    base = TinyConvFormer().state_dict()
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    for t in range(tasks):
        tuned = {}
        for name, w in base.items():
            if w.dim() >= 2:
                m = w.reshape(w.shape[0], -1)
                delta = 0.05 * torch.randn(m.shape[0], 2) @ torch.randn(2, m.shape[1]) / m.shape[1] ** 0.5
                tuned[name] = w + delta.reshape(w.shape)
            else:
                tuned[name] = w + 0.01 * torch.randn(w.shape)
        save_file(tuned, str(root / f"task{t}.safetensors"))


# --- example: end


def test_doc_holds_the_same_example():
    doc = (Path(__file__).parents[1] / "docs" / "custom_adapter.md").read_text()
    block = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    src = Path(__file__).read_text()
    example = src.split("# --- example: begin\n")[1].split("# --- example: end\n")[0]
    assert block.strip() == example.strip()


def test_custom_adapter_merges(tmp_path, capsys):
    from didi.artifact import load_artifact
    from didi.backbones import get_adapter_class
    from didi.cli import main
    from helpers import FAST_MERGE, expected_task_state

    write_zoo(tmp_path / "zoo")
    assert get_adapter_class("tiny_convformer") is TinyConvFormerAdapter
    z = tmp_path / "zoo"
    rc = main(
        [
            "merge",
            str(z / "base.safetensors"),
            f"{{a: {z}/task0.safetensors, b: {z}/task1.safetensors, c: {z}/task2.safetensors}}",
            str(tmp_path / "merged"),
            "--budget",
            "1.5",
            "--backbone",
            f"{__name__}.TinyConvFormerAdapter",
            "--backbone.depth",
            "2",
            "--decompose.cache_dir",
            str(tmp_path / "cache"),
            *FAST_MERGE,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    art = load_artifact(tmp_path / "merged")
    from safetensors.torch import load_file

    base = load_file(str(z / "base.safetensors"))
    assert art.manifest["adapter"]["name"] == "tiny_convformer"
    assert art.manifest["base_params"] == sum(v.numel() for k, v in base.items() if not k.startswith("head."))
    assert "stem.weight" in art.manifest["ranks"] and "head.weight" not in art.manifest["tensors"]
    adapter = art.adapter()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in art.tasks:
            merged = adapter.build_model(art.task_state_dict(t))(x)
            dense = adapter.build_model(expected_task_state(tmp_path / "merged", t, base))(x)
            torch.testing.assert_close(merged, dense, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(merged, adapter.build_model(base)(x))
