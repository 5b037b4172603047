"""HF CLIP vision towers (`CLIPModel`, `CLIPVisionModel`, `CLIPVisionModelWithProjection` directories).

Scope = the vision tower, as in the open_clip adapter: every `vision_model.*` tensor (transformers-4 names; a
transformers-5 `CLIPVisionModel` file without that prefix is read under the same names) plus
`visual_projection.weight` when the checkpoint has one (open_clip's `visual.proj`, stored transposed). HF
keeps q, k and v as three (w×w) projections where open_clip keeps one (3w×w) `in_proj_weight`; with
`fuse_qkv=True` the adapter presents them as one `...self_attn.qkv_proj.weight` / `.bias` (rows q, k, v: the
in_proj layout), so an HF checkpoint and its open_clip twin are decomposed matrix for matrix, with the same
ranks, the same budget and the same result. The default keeps the three HF matrices (each gets its own rank,
and names stay those of the runnable HF model, which routed wrapping and PEFT export address).
The architecture comes from config.json (transformers classes, never remote code).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

from didi.backbones.base import Adapter, NonMatrixPolicy
from didi.backbones.registry import register_adapter
from didi.errors import DidiError
from didi.sources import TensorSource

CLIP_CLASSES = ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_QKV_RE = re.compile(r"^(.*\.self_attn)\.(q|k|v)_proj\.(weight|bias)$")


# ----------------------------------------------------------------------------------- shared HF helpers
def read_config_json(path: str | Path) -> dict | None:
    """config.json of a checkpoint directory (or next to a file), or None when there is none."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p.with_name("config.json")
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DidiError(f"{f}: corrupt config.json ({e})") from e


def resolve_config(config: dict | str | None, presets: dict[str, dict] | None = None) -> dict | None:
    """A config dict from a dict, a preset name, a config.json path or a checkpoint directory."""
    if config is None or isinstance(config, dict):
        return config
    if presets and config in presets:
        return dict(presets[config])
    p = Path(config)
    if p.is_dir() or p.name == "config.json":
        cfg = read_config_json(p if p.is_dir() else p.parent)
        if cfg is not None:
            return cfg
    raise DidiError(
        f"config: {config!r} is neither a preset ({sorted(presets or {})}), nor a config.json, nor a "
        f"directory holding one"
    )


def check_model_type(path: str | Path, cfg: dict | None, allowed: tuple[str, ...], adapter: str) -> None:
    """A checkpoint of another family (by its config.json) is refused before anything is read."""
    if cfg is not None and cfg.get("model_type") not in allowed:
        raise DidiError(
            f"{path}: config.json says model_type {cfg.get('model_type')!r}, adapter '{adapter}' "
            f"expects {' or '.join(map(repr, allowed))}; pick the adapter of that family"
        )


_UNPREFIXED = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def canonical_name(name: str) -> str:
    """transformers ≥ 5 saves `CLIPVisionModel` without the `vision_model.` prefix that 4.x (and the hub's
    fine-tunes) use; didi names tensors the 4.x way in both cases."""
    return f"vision_model.{name}" if name.startswith(_UNPREFIXED) else name


class RenamedSource:
    """A TensorSource view under other names (`rename`: new name → name in the checkpoint)."""

    def __init__(self, src, rename: dict[str, str]) -> None:
        self.src, self.path, self._old = src, src.path, rename

    def keys(self) -> list[str]:
        return list(self._old)

    def __contains__(self, name: str) -> bool:
        return name in self._old

    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shape(self._old[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.src.dtype(self._old[name])

    def get(self, name: str) -> torch.Tensor:
        return self.src.get(self._old[name])

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._old:
            yield k, self.get(k)


class FusedQKVSource:
    """A TensorSource view that replaces each q/k/v triple by one fused tensor (rows q, k, v)."""

    def __init__(self, src: TensorSource) -> None:
        self.src, self.path = src, src.path
        self._parts: dict[str, list[str]] = {}
        keys: list[str] = []
        for k in src.keys():
            m = _QKV_RE.match(k)
            if not m:
                keys.append(k)
                continue
            fused = f"{m.group(1)}.qkv_proj.{m.group(3)}"
            if fused not in self._parts:
                parts = [f"{m.group(1)}.{x}_proj.{m.group(3)}" for x in "qkv"]
                if not all(p in src for p in parts):
                    raise DidiError(f"{src.path}: '{k}' has no complete q/k/v triple to fuse ({parts})")
                self._parts[fused] = parts
                keys.append(fused)
        self._keys = keys

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._parts or (name in self.src and not _QKV_RE.match(name))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._parts:
            shapes = [self.src.shape(p) for p in self._parts[name]]
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return self.src.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.src.dtype(self._parts[name][0] if name in self._parts else name)

    def get(self, name: str) -> torch.Tensor:
        if name in self._parts:
            return torch.cat([self.src.get(p) for p in self._parts[name]])
        return self.src.get(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._keys:
            yield k, self.get(k)


def unfuse_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `FusedQKVSource`: split every `...qkv_proj.{weight,bias}` back into q, k and v."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^(.*\.self_attn)\.qkv_proj\.(weight|bias)$", k)
        if not m:
            out[k] = v
            continue
        for x, part in zip("qkv", v.chunk(3, dim=0)):
            out[f"{m.group(1)}.{x}_proj.{m.group(2)}"] = part
    return out


# ------------------------------------------------------------------------------------------- adapter
@register_adapter("hf_clip")
class HFClipAdapter(Adapter):
    """HF CLIP directories (config.json + model.safetensors or a sharded index).

    Args:
        config: the architecture: a config dict, a config.json path or a directory; default: the base
            model's config.json (recorded in the artifact's manifest, so the artifact alone rebuilds it).
        fuse_qkv: decompose q/k/v as one (3w×w) matrix per layer, like open_clip's `in_proj_weight`.
        include: fnmatch patterns of vision tensors to decompose (default: every 2-D and conv weight).
        exclude: fnmatch patterns never decomposed.
        nonmatrix_policy: `shared` or `per_task` for biases, norms and the class embedding.
    """

    matrix_ndims = (2, 4)  # the patch-embedding conv kernel too

    def __init__(
        self,
        config: dict | str | None = None,
        fuse_qkv: bool = False,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        nonmatrix_policy: NonMatrixPolicy = "shared",
    ) -> None:
        super().__init__(include, exclude, nonmatrix_policy)
        self.config = resolve_config(config)
        self.fuse_qkv = fuse_qkv
        self._shapes: dict[str, tuple[int, ...]] | None = None

    # ------------------------------------------------------------------------------------ architecture
    def architecture(self) -> str:
        archs = (self.config or {}).get("architectures") or []
        if archs and archs[0] in CLIP_CLASSES:
            return archs[0]
        return "CLIPModel" if (self.config or {}).get("model_type") == "clip" else "CLIPVisionModel"

    def create(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        import transformers

        if self.config is None:
            raise DidiError(
                "hf_clip: no config; open the base model first or pass config (a config.json path)"
            )
        cfg_cls = (
            transformers.CLIPConfig
            if self.config.get("model_type") == "clip"
            else transformers.CLIPVisionConfig
        )
        cfg = cfg_cls.from_dict({k: v for k, v in self.config.items() if k != "transformers_version"})
        with torch.device(device):
            return getattr(transformers, self.architecture())(cfg)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            sd = self.create("meta").state_dict()
            self._shapes = {canonical_name(k): tuple(v.shape) for k, v in sd.items()}
        return self._shapes

    # ----------------------------------------------------------------------------------------- hooks
    def open_source(self, path: str | Path, allow_pickle: bool = False):
        cfg = read_config_json(path)
        check_model_type(path, cfg, ("clip", "clip_vision_model"), self.registry_name)
        if self.config is None:
            if cfg is None:
                raise DidiError(f"{path}: no config.json next to the weights; pass the adapter's config")
            self.config = cfg
        src = TensorSource(path, allow_pickle=allow_pickle)
        if any(canonical_name(k) != k for k in src.keys()):
            src = RenamedSource(src, {canonical_name(k): k for k in src.keys()})
        names = [k for k in src.keys() if self.in_scope(k)]
        if not names:
            raise DidiError(
                f"{path}: not a Hugging Face CLIP checkpoint: no 'vision_model.*' tensors; "
                f"first keys: {src.keys()[:3]}"
            )
        expected = {k: s for k, s in self.expected_shapes().items() if self.in_scope(k)}
        for label, a, b in (("missing", expected, names), ("not part of the model", names, expected)):
            diff = sorted(set(a) - set(b))
            if diff:
                raise DidiError(
                    f"{path}: tensor '{diff[0]}' is {label} ({self.architecture()} of the config: "
                    f"{self.config.get('vision_config', self.config).get('num_hidden_layers')} layers)"
                    + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else "")
                )
        for k in names:
            if tuple(src.shape(k)) != expected[k]:
                raise DidiError(
                    f"{path}: tensor '{k}' has shape {list(src.shape(k))}, the config "
                    f"({self.architecture()}) expects {list(expected[k])}"
                )
        return FusedQKVSource(src) if self.fuse_qkv else src

    def in_scope(self, name: str) -> bool:
        return name.startswith("vision_model.") or name == "visual_projection.weight"

    def layer_of(self, name: str) -> tuple[int, str]:
        m = _LAYER_RE.match(name)
        return (int(m.group(1)), m.group(2)) if m else (-1, name.removeprefix("vision_model."))

    component_rule = (
        "per layer: layer.{i}.attn (self_attn.*, layer_norm1), layer.{i}.mlp (mlp.*, layer_norm2); "
        "embed (embeddings.*, pre_layrnorm); head (post_layernorm, visual_projection)"
    )

    attn_parts = ("self_attn.", "layer_norm1.")
    mlp_parts = ("mlp.", "layer_norm2.")

    def component_of(self, name: str) -> str:
        return super().component_of(canonical_name(name))

    def outside_component(self, name: str) -> str:
        if not self.in_scope(name):  # the text tower (not merged): the generic rule
            return super().outside_component(name)
        first = name.removeprefix("vision_model.").split(".", 1)[0]
        if first in ("embeddings", "pre_layrnorm"):
            return "embed"
        if first in ("post_layernorm", "visual_projection"):
            return "head"
        return first

    def listing_shapes(self) -> dict[str, tuple[int, ...]] | None:
        if self.config is None:  # the architecture comes from the base model's config.json
            return None
        return {k: s for k, s in self.expected_shapes().items() if self.in_scope(k)}

    def locate(self, name: str) -> tuple[str, str]:
        if self.fuse_qkv and ".qkv_proj." in name:
            raise DidiError(
                f"'{name}' is a fused q/k/v matrix with no single module in the HF model; "
                f"use fuse_qkv=false for routed wrapping"
            )
        return super().locate(name)

    def build_model(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The HF model of the config, loaded strictly (fused q/k/v split back), in eval mode."""
        sd = unfuse_qkv(state_dict) if self.fuse_qkv else dict(state_dict)
        model = self.create("cpu")
        own = {canonical_name(k): k for k in model.state_dict()}  # the model's own naming of each tensor
        sd = {own.get(k, k): v for k, v in sd.items()}
        ref = next((v for k, v in sd.items() if k.endswith("patch_embedding.weight")), None)
        if ref is not None:
            model = model.to(ref.dtype)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise DidiError(
                f"state dict does not fit {self.architecture()}: {' '.join(str(e).split())[:400]}"
            ) from e
        return model.eval()

    def settings(self) -> dict:
        return {**super().settings(), "config": self.config, "fuse_qkv": self.fuse_qkv}
