"""Hugging Face Llama (`LlamaForCausalLM`) directories, streamed one tensor at a time.

Sharded checkpoints are read through `model.safetensors.index.json` (memory-mapped, one tensor per read), so
T+1 models of 16 GB never sit in host memory together. bf16/fp16 tensors are decomposed in fp32 (Zoo.read
casts per tensor) and `Artifact.task_state_dict` returns them in the base dtype. The attention and MLP
projections (q/k/v/o, gate/up/down) are decomposed; `embed_tokens` and `lm_head` follow an explicit policy.
Every checkpoint is checked against the config (vocabulary, width, layer count, every shape) when opened.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch

from didi.backbones.base import Adapter, NonMatrixPolicy
from didi.backbones.hf_clip import check_model_type, read_config_json, resolve_config
from didi.backbones.registry import register_adapter
from didi.errors import DidiError
from didi.sources import TensorSource

EmbeddingPolicy = Literal["low_rank", "per_task", "shared"]

#: Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json, architecture fields only): |θ0| = 8,030,261,248.
LLAMA_3_1_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
PRESETS = {"llama-3.1-8b": LLAMA_3_1_8B}

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
_PROJ_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@register_adapter("hf_llama")
class HFLlamaAdapter(Adapter):
    """`LlamaForCausalLM` checkpoints: q/k/v/o/gate/up/down decomposed, embeddings by `embeddings`.

    Args:
        config: the architecture: a preset (`llama-3.1-8b`), a config dict, a config.json path or a directory;
            default: the base model's config.json (recorded in the manifest).
        embeddings: `embed_tokens` and `lm_head`: `low_rank` (decomposed like the projections), `per_task`
            (each task's exact delta, priced in the budget) or `shared` (mean delta folded into the base).
        include: fnmatch patterns restricting which projections are decomposed.
        exclude: fnmatch patterns of tensors never decomposed.
        nonmatrix_policy: for norms and anything else not decomposed (the embeddings follow `embeddings`,
            through `policy_of`).
    """

    def __init__(
        self,
        config: dict | str | None = None,
        embeddings: EmbeddingPolicy = "low_rank",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        nonmatrix_policy: NonMatrixPolicy = "shared",
    ) -> None:
        if embeddings not in ("low_rank", "per_task", "shared"):
            raise DidiError(f"embeddings: expected 'low_rank', 'per_task' or 'shared', found {embeddings!r}")
        super().__init__(include, exclude, nonmatrix_policy)
        self.config = resolve_config(config, PRESETS)
        self.embeddings = embeddings
        self._shapes: dict[str, tuple[int, ...]] | None = None

    # ------------------------------------------------------------------------------------ architecture
    def hf_config(self):
        from transformers import LlamaConfig

        if self.config is None:
            raise DidiError("hf_llama: no config; open the base model first or pass config (preset or path)")
        return LlamaConfig.from_dict({k: v for k, v in self.config.items() if k != "transformers_version"})

    def create(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
        from transformers import LlamaForCausalLM

        cfg = self.hf_config()
        old = torch.get_default_dtype()
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensors of the config (a tied `lm_head` is not stored) and their shapes."""
        if self._shapes is None:
            sd = self.create("meta").state_dict()
            self._shapes = {
                k: tuple(v.shape) for k, v in sd.items() if not (k == "lm_head.weight" and self.tied)
            }
        return self._shapes

    @property
    def tied(self) -> bool:
        return bool((self.config or {}).get("tie_word_embeddings", False))

    # ----------------------------------------------------------------------------------------- hooks
    def policy_of(self, name: str):
        if self.embeddings != "low_rank" and name in ("model.embed_tokens.weight", "lm_head.weight"):
            return self.embeddings
        return self.nonmatrix_policy

    def open_source(self, path: str | Path, allow_pickle: bool = False) -> TensorSource:
        cfg = read_config_json(path)
        check_model_type(path, cfg, ("llama",), self.registry_name)
        if self.config is None:
            if cfg is None:
                raise DidiError(
                    f"{path}: no config.json next to the weights; pass config (a preset or a path)"
                )
            self.config = cfg
        src = TensorSource(path, allow_pickle=allow_pickle)
        self._check(path, src)
        return src

    def _check(self, path, src: TensorSource) -> None:
        """Vocabulary, width and layer count first (the usual mistakes, named plainly), then every shape."""
        c = self.config
        names = [k for k in src.keys() if self.in_scope(k)]
        if "model.embed_tokens.weight" not in src:
            raise DidiError(
                f"{path}: not a Llama checkpoint: no 'model.embed_tokens.weight'; first keys: "
                f"{src.keys()[:3]}"
            )
        for emb in EMBEDDINGS:
            if emb in src:
                vocab, width = src.shape(emb)
                if vocab != c["vocab_size"]:
                    raise DidiError(
                        f"{path}: vocabulary size {vocab} ('{emb}' {list(src.shape(emb))}) differs from "
                        f"the base model's vocabulary size {c['vocab_size']}; models with different "
                        f"tokenizers cannot be merged (resize the embeddings of one of them first)"
                    )
                if width != c["hidden_size"]:
                    raise DidiError(
                        f"{path}: hidden size {width} ('{emb}') differs from the base model's "
                        f"{c['hidden_size']}"
                    )
        layers = {int(m.group(1)) for k in names if (m := _LAYER_RE.match(k))}
        if len(layers) != c["num_hidden_layers"]:
            raise DidiError(
                f"{path}: {len(layers)} decoder layers, the base model has {c['num_hidden_layers']}"
            )
        expected = self.expected_shapes()
        missing = sorted(set(expected) - set(names))
        if missing:
            raise DidiError(
                f"{path}: tensor '{missing[0]}' of the Llama config is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = sorted(set(names) - set(expected) - ({"lm_head.weight"} if self.tied else set()))
        if extra:
            raise DidiError(
                f"{path}: tensor '{extra[0]}' is not part of the Llama config"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for k in names:
            if k in expected and tuple(src.shape(k)) != expected[k]:
                raise DidiError(
                    f"{path}: tensor '{k}' has shape {list(src.shape(k))}, the base model's config "
                    f"expects {list(expected[k])}"
                )

    def in_scope(self, name: str) -> bool:
        """The whole model, except rotary caches that old checkpoints stored."""
        return not name.endswith("rotary_emb.inv_freq")

    def is_decomposed(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        if not dtype.is_floating_point or len(shape) != 2:
            return False
        if name in EMBEDDINGS:
            return self.embeddings == "low_rank" and self._pattern_ok(name)
        return bool(_PROJ_RE.match(name)) and self._pattern_ok(name)

    def layer_of(self, name: str) -> tuple[int, str]:
        m = _LAYER_RE.match(name)
        return (int(m.group(1)), m.group(2)) if m else (-1, name)

    component_rule = (
        "per layer: layer.{i}.attn (self_attn.*, input_layernorm), "
        "layer.{i}.mlp (mlp.*, post_attention_layernorm); embed (embed_tokens); head (norm, lm_head)"
    )

    attn_parts = ("self_attn.", "input_layernorm.")
    mlp_parts = ("mlp.", "post_attention_layernorm.")

    def outside_component(self, name: str) -> str:
        if name.startswith("model.embed_tokens."):
            return "embed"
        if name.startswith(("model.norm.", "lm_head.")):
            return "head"
        return super().outside_component(name)

    def listing_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """The config's tensors; without a config, those of the first preset (`llama-3.1-8b`, on meta)."""
        a = self if self.config is not None else HFLlamaAdapter(config=next(iter(PRESETS)))
        return {k: s for k, s in a.expected_shapes().items() if a.in_scope(k)}

    def build_model(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """`LlamaForCausalLM` of the config holding `state_dict`'s tensors (no copy, built on meta)."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        sd = dict(state_dict)
        if self.tied and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        dtype = sd["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in sd else None
        model = self.create("meta", dtype)
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise DidiError(
                f"state dict does not fit the Llama config: {' '.join(str(e).split())[:400]}"
            ) from e
        with torch.device("cpu"):  # its buffers are not in the state dict, so they are still on meta
            model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise DidiError(f"Llama model: tensor '{left[0]}' was not filled from the state dict")
        if self.tied:
            model.tie_weights()
        return model.eval()

    def settings(self) -> dict:
        return {**super().settings(), "config": self.config, "embeddings": self.embeddings}
