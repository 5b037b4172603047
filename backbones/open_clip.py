"""open_clip CLIP models: the visual tower is merged, the text tower rides along (zero-shot heads need it).

Any open_clip model name works (`ViT-B-32` and `ViT-L-14` are the tested presets, |θ0| = 87,849,216 and
303,966,208: every `visual.*` tensor); a custom architecture is given as an open_clip model config dict.
Every 2-D visual tensor (including `attn.in_proj_weight`, `positional_embedding` and `proj`) and the 4-D
patch embedding `conv1.weight` (reshaped to (out, in·kh·kw)) are decomposed. Each checkpoint is checked
against the architecture (built on the meta device, no weights) when it is opened, so a wrong width, layer
count or family is reported before any SVD.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from didi.backbones.base import Adapter, NonMatrixPolicy
from didi.backbones.registry import register_adapter
from didi.errors import DidiError
from didi.sources import TensorSource

PRESETS = ("ViT-B-32", "ViT-L-14")
_BLOCK_RE = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")


@contextmanager
def _quiet_open_clip():
    """open_clip logs a warning whenever a model is created without pretrained weights (always, here)."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@register_adapter("open_clip")
class OpenClipAdapter(Adapter):
    """open_clip CLIP checkpoints (safetensors, or pickled state dicts with allow_pickle).

    Args:
        model_name: open_clip architecture name (`ViT-B-32`, `ViT-L-14`, `ViT-B-16-quickgelu`, ...).
        model_config: an open_clip model config dict ({embed_dim, vision_cfg, text_cfg, ...}) for an
            architecture open_clip does not name; overrides `model_name`.
        include: fnmatch patterns of visual tensors to decompose (default: every 2-D and conv weight).
        exclude: fnmatch patterns of visual tensors never decomposed.
        nonmatrix_policy: `shared` (mean delta folded into the base) or `per_task` for biases, norms,
            class embedding and anything excluded.
    """

    matrix_ndims = (2, 4)  # the patch-embedding conv kernel too

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        model_config: dict | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        nonmatrix_policy: NonMatrixPolicy = "shared",
    ) -> None:
        super().__init__(include, exclude, nonmatrix_policy)
        self.model_name = model_name
        self.model_config = dict(model_config) if model_config else None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def arch(self) -> str:
        return "custom model_config" if self.model_config else f"open_clip model '{self.model_name}'"

    # ------------------------------------------------------------------------------------ architecture
    def create(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The architecture with random (or, on `meta`, no) weights; never downloads anything."""
        import open_clip

        with _quiet_open_clip(), torch.device(device):
            if self.model_config:
                cfg = dict(self.model_config)
                cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
                return cls(**cfg)
            if self.model_name not in open_clip.list_models():
                raise DidiError(
                    f"open_clip: unknown model_name {self.model_name!r}; see open_clip.list_models() "
                    f"(presets: {', '.join(PRESETS)}) or pass model_config"
                )
            return open_clip.create_model(self.model_name, pretrained=None, device=device)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state-dict tensor of the architecture and its shape (built on the meta device)."""
        if self._shapes is None:
            sd = self.create("meta").state_dict()
            self._shapes = {k: tuple(v.shape) for k, v in sd.items()}
        return self._shapes

    # ----------------------------------------------------------------------------------------- hooks
    def open_source(self, path: str | Path, allow_pickle: bool = False) -> TensorSource:
        src = TensorSource(path, allow_pickle=allow_pickle)
        keys = src.keys()
        visual = [k for k in keys if self.in_scope(k)]
        if not visual:
            hint = ""
            if "conv1.weight" in keys or any(k.startswith("transformer.resblocks.") for k in keys):
                hint = " (it looks like a visual-tower-only state dict saved without the 'visual.' prefix)"
            elif any(k.startswith(("vision_model.", "model.layers.")) for k in keys):
                hint = " (it looks like a Hugging Face checkpoint: use the hf_clip or hf_llama adapter)"
            raise DidiError(
                f"{path}: not an open_clip CLIP checkpoint: no 'visual.*' tensors{hint}; "
                f"first keys: {keys[:3]}"
            )
        expected = {k: s for k, s in self.expected_shapes().items() if self.in_scope(k)}
        missing = sorted(set(expected) - set(visual))
        if missing:
            raise DidiError(
                f"{path}: tensor '{missing[0]}' of {self.arch} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; is model_name right?"
            )
        extra = sorted(set(visual) - set(expected))
        if extra:
            raise DidiError(
                f"{path}: tensor '{extra[0]}' is not part of {self.arch}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "; is model_name right?"
            )
        for k in visual:
            if tuple(src.shape(k)) != expected[k]:
                raise DidiError(
                    f"{path}: tensor '{k}' has shape {list(src.shape(k))}, {self.arch} expects "
                    f"{list(expected[k])}; is model_name right?"
                )
        return src

    def in_scope(self, name: str) -> bool:
        """The visual tower defines |θ0|; the text tower is not merged."""
        return name.startswith("visual.")

    def layer_of(self, name: str) -> tuple[int, str]:
        m = _BLOCK_RE.match(name)
        if m:
            return int(m.group(1)), m.group(2)
        return -1, name.removeprefix("visual.")

    component_rule = (
        "per layer: layer.{i}.attn (attn.*, ln_1, ls_1), layer.{i}.mlp (mlp.*, ln_2, ls_2); "
        "embed (conv1, class_embedding, positional_embedding, ln_pre); head (ln_post, proj)"
    )

    attn_parts = ("attn.", "ln_1.", "ls_1.")
    mlp_parts = ("mlp.", "ln_2.", "ls_2.")

    def outside_component(self, name: str) -> str:
        if not self.in_scope(name):  # the text tower (not merged): the generic rule
            return super().outside_component(name)
        first = name.removeprefix("visual.").split(".", 1)[0]
        if first in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
            return "embed"
        if first in ("ln_post", "proj"):
            return "head"
        return first

    def listing_shapes(self) -> dict[str, tuple[int, ...]] | None:
        return {k: s for k, s in self.expected_shapes().items() if self.in_scope(k)}

    def build_model(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The whole CLIP model (both towers) loaded strictly from `state_dict`, in eval mode."""
        model = self.create("cpu")
        ref = state_dict.get("visual.conv1.weight")
        if ref is not None and ref.dtype.is_floating_point:
            model = model.to(ref.dtype)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise DidiError(
                f"state dict does not fit {self.arch}: {str(e).splitlines()[0]} "
                f"{' '.join(str(e).split())[:400]}"
            ) from e
        return model.eval()

    def settings(self) -> dict:
        return {**super().settings(), "model_name": self.model_name, "model_config": self.model_config}
