"""Helpers shared by several test modules: they import from here, never from each other (`pythonpath = tests`
in setup.cfg puts this folder on sys.path); fixtures live in conftest.py.

- Backbone adapters: `synthetic_finetunes` (fine-tunes with planted low-rank deltas), `check_nonmatrix_policy`
  and `expected_task_state`, which recomputes θ0 + τ̃_t straight from the artifact's safetensors (A_s@B_s +
  A_t@B_t reshaped, plus the non-matrix deltas) without `Artifact.task_deltas`, so that the adapters' round
  trip is checked against a second implementation.
- A tiny BERT zoo: `tiny_bert_config`, `save_hf` (HF or sentence-transformers layout), `make_bert_zoo`,
  `tiny_merge` (a merge in a few seconds on CPU), and the word list `WORDS` / `add_vocab` for its tokenizer.
- Tiny configs of the other families: `OPEN_CLIP_TINY`, `tiny_llama_config`, `tiny_clip_config`; the CLI flags
  of a quiet CPU run and a short merge: `CPU_QUIET`, `FAST_MERGE`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from didi.backbones import Adapter
from didi.decompose import DecomposeConfig
from didi.pipeline import MergeOptions, run_merge
from didi.refine import RefineConfig
from didi.search import SearchConfig
from didi.trainer import TrainerConfig

# --- backbone adapters: synthetic fine-tunes and an independent τ̃


def lowrank_delta(shape: tuple[int, int], rank: int, scale: float, g: torch.Generator) -> torch.Tensor:
    m, n = shape
    a, b = torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
    return scale * (a @ b) / math.sqrt(rank * n)


def synthetic_finetunes(
    adapter: Adapter, base: dict[str, torch.Tensor], T: int = 3, seed: int = 0, scale: float = 0.1
) -> list[dict[str, torch.Tensor]]:
    """θ_t = θ0 + shared rank-1 + own rank-2 deltas on decomposed tensors, small dense deltas on other
    in-scope floating tensors; out-of-scope tensors are untouched. Computed in fp32, stored in θ0's dtype."""
    g = torch.Generator().manual_seed(seed)
    shared, own = {}, [dict() for _ in range(T)]
    for k, v in base.items():
        if not adapter.in_scope(k) or not v.dtype.is_floating_point:
            continue
        if adapter.is_decomposed(k, tuple(v.shape), v.dtype):
            ms = adapter.matrix_shape(k, tuple(v.shape))
            shared[k] = lowrank_delta(ms, 1, scale, g).reshape(v.shape)
            for t in range(T):
                own[t][k] = lowrank_delta(ms, 2, scale, g).reshape(v.shape)
        else:
            shared[k] = torch.zeros(v.shape)
            for t in range(T):
                own[t][k] = 0.01 * torch.randn(v.shape, generator=g)
    out = []
    for t in range(T):
        out.append(
            {
                k: ((v.float() + shared[k] + own[t][k]).to(v.dtype) if k in shared else v.clone())
                for k, v in base.items()
            }
        )
    return out


def expected_task_state(
    artifact: str | Path, task: str, base: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ0 + τ̃_task in fp32, from the raw artifact files (an implementation independent of artifact.py)."""
    root = Path(artifact)
    deltas: dict[str, torch.Tensor] = {}

    def add(name, d):
        d = d.float().reshape(base[name].shape)
        deltas[name] = deltas.get(name, 0) + d

    fold = root / "fold.safetensors"
    if fold.exists():
        for name, d in load_file(str(fold)).items():
            add(name, d)
    shared = load_file(str(root / "shared.safetensors"))
    own = load_file(str(root / "tasks" / f"{task}.safetensors"))
    for terms in (shared, own):
        for name in {k.rsplit("::", 1)[0] for k in terms}:
            if f"{name}::lora_A" in terms:
                add(name, terms[f"{name}::lora_A"].double() @ terms[f"{name}::lora_B"].double())
            if f"{name}::dense" in terms:
                add(name, terms[f"{name}::dense"])
            if f"{name}::mask" in terms:
                add(
                    name,
                    own[f"{name}::scale"].double()
                    * terms[f"{name}::mask"].double()
                    * shared[f"{name}::ref"].double(),
                )
    return {k: (v.float() + deltas[k]) if k in deltas else v.float() for k, v in base.items()}


def check_nonmatrix_policy(
    artifact: str | Path, adapter: Adapter, base: dict, tunes: dict[str, dict]
) -> None:
    """`shared`: fold = mean task delta of every non-decomposed in-scope tensor; `per_task`: exact deltas."""
    root = Path(artifact)
    fold = load_file(str(root / "fold.safetensors")) if (root / "fold.safetensors").exists() else {}
    checked = 0
    for k, v in base.items():
        if (
            not adapter.in_scope(k)
            or not v.dtype.is_floating_point
            or adapter.is_decomposed(k, tuple(v.shape), v.dtype)
        ):
            continue
        deltas = [tunes[t][k].float() - v.float() for t in tunes]
        if not any(bool(d.abs().max() > 0) for d in deltas):
            continue
        checked += 1
        if adapter.policy_of(k) == "shared":
            torch.testing.assert_close(fold[k], torch.stack(deltas).mean(0), rtol=1e-5, atol=1e-6)
        else:
            assert k not in fold
            for t, d in zip(tunes, deltas):
                own = load_file(str(root / "tasks" / f"{t}.safetensors"))
                torch.testing.assert_close(own[f"{k}::dense"], d)
    assert checked > 0


# --- a tiny BERT zoo (hf_encoder): 2 layers of width 32, a 50-token vocabulary

WORDS = [f"w{i}" for i in range(45)]


def add_vocab(d: Path) -> None:
    """A WordPiece vocab.txt in `d`: the 5 special tokens and WORDS (50 = the tiny BERT's vocab_size)."""
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=24,
    )


def save_hf(model, path, st_layout=False):
    """HF layout (config.json + model.safetensors) or sentence-transformers layout (modules.json and a
    sub-folder)."""
    path.mkdir(parents=True)
    d = path / "0_Transformer" if st_layout else path
    d.mkdir(exist_ok=True)
    model.config.to_json_file(str(d / "config.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    if st_layout:
        (path / "modules.json").write_text(
            json.dumps(
                [
                    {
                        "idx": 0,
                        "name": "0",
                        "path": "0_Transformer",
                        "type": "sentence_transformers.models.Transformer",
                    },
                    {
                        "idx": 1,
                        "name": "1",
                        "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling",
                    },
                ]
            )
        )
    return path


def make_bert_zoo(root, T=3, seed=0):
    """θ0 = a random tiny BERT; task t = θ0 + low-rank changes of the Linear weights + small vector
    changes."""
    from transformers import BertModel

    torch.manual_seed(seed)
    base = BertModel(tiny_bert_config()).eval()
    base_path = save_hf(base, root / "base", st_layout=True)
    g = torch.Generator().manual_seed(seed + 1)
    tasks = {}
    for t in range(T):
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        for k, v in sd.items():
            if k.endswith("dense.weight") or k.endswith(("query.weight", "key.weight", "value.weight")):
                m, n = v.shape
                sd[k] = v + 0.05 * torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
            elif v.dtype.is_floating_point and v.dim() == 1:
                sd[k] = v + 0.01 * torch.randn(v.shape, generator=g)
        ft = BertModel(tiny_bert_config())
        ft.load_state_dict(sd)
        tasks[f"task{t}"] = str(save_hf(ft, root / f"task{t}"))
    return str(base_path), tasks


def tiny_merge(zoo, out, budget=1.3):
    """`didi merge` of `zoo` into `out` with few steps on CPU (seconds); the factor cache beside `out`."""
    options = MergeOptions(
        budget,
        DecomposeConfig(cache_dir=str(out.parent / "cache"), device="cpu"),
        SearchConfig(steps=15),
        RefineConfig(sweeps=1, power_iters=1),
        TrainerConfig(accelerator="cpu", logger="none", progress_bar=False),
    )
    return run_merge(zoo, out, options, progress=False)


#: `didi.cli.main` flags of a quiet CPU run: no logger, no progress bar
CPU_QUIET = [
    "--decompose.device",
    "cpu",
    "--trainer.accelerator",
    "cpu",
    "--trainer.logger",
    "none",
    "--trainer.progress_bar",
    "false",
]
#: ... and a short merge (20 search steps, one ALS sweep)
FAST_MERGE = ["--search.steps", "20", "--refine.sweeps", "1", *CPU_QUIET]


#: a tiny open_clip CLIP (2 vision blocks of width 32, 1 text layer), as `OpenClipAdapter(model_config=...)`
OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def tiny_llama_config(vocab=64, hidden=32, layers=2, **kw):
    """A 2-layer Llama (grouped-query attention, untied embeddings) in the shapes the tests use."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        **kw,
    )


def tiny_clip_config(width=32, layers=2, patch=8, image=16, proj=16, heads=2, **kw):
    """A tiny HF CLIP (vision tower of `layers` blocks, 1-layer text tower)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            patch_size=patch,
            image_size=image,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=8,
        ),
        projection_dim=proj,
        **kw,
    )


def _delta(m: int, n: int, rank: int, scale: float, decay: float, g: torch.Generator) -> torch.Tensor:
    """A low-rank delta with singular values scale·i^(−decay), i = 1..rank."""
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    return (U * (scale * torch.arange(1, rank + 1, dtype=torch.float64) ** -decay)) @ V.T


def _finetune_taus(m: int, n: int, T: int, g: torch.Generator) -> torch.Tensor:
    """Fine-tune-like task vectors: a shared and an own low-rank part with decaying σ, plus small noise."""
    r = min(m, n)
    shared = _delta(m, n, min(12, r), 1.0, 0.7, g)
    return torch.stack(
        [
            shared + _delta(m, n, min(10, r), 0.6, 0.5, g) + 1e-3 * torch.randn(m, n, generator=g) / n**0.5
            for _ in range(T)
        ]
    )


def write_finetune_zoo(
    root: Path, shapes: dict[str, tuple[int, ...]], T: int = 3, seed: int = 0
) -> tuple[str, dict[str, str]]:
    """A fine-tune-like zoo of float32 files, written here, not by didi: base.safetensors and
    task<t>.safetensors = base + τ_t for each shape, plus a bias."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base, tasks = {}, [{} for _ in range(T)]
    for name, shape in shapes.items():
        m, n = shape[0], math.prod(shape[1:])
        base[name] = (torch.randn(m, n, generator=g) / n**0.5).reshape(shape)
        for t, tau in enumerate(_finetune_taus(m, n, T, g)):
            tasks[t][name] = (base[name] + tau.float().reshape(shape)).contiguous()
    base["bias"] = torch.zeros(7)
    save_file(base, str(root / "base.safetensors"))
    paths = {}
    for t in range(T):
        tasks[t]["bias"] = torch.full((7,), 0.01 * t)
        paths[f"task{t}"] = str(root / f"task{t}.safetensors")
        save_file(tasks[t], paths[f"task{t}"])
    return str(root / "base.safetensors"), paths


def random_texts(g: torch.Generator, vocab: list[str], n: int) -> list[dict]:
    """n six-word texts drawn from `vocab` with random binary labels (tiny text tasks for router/MERGE tests;
    disjoint vocabularies make tasks trivially separable)."""
    return [
        {
            "text": " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (6,), generator=g)),
            "label": int(torch.randint(0, 2, (1,), generator=g)),
        }
        for _ in range(n)
    ]


def make_text_task_zoo(root: Path, splits: dict[str, int | dict[str, int]]) -> tuple[str, dict, dict]:
    """A 3-task tiny-BERT zoo (`make_bert_zoo`) for routing tests: random 2-class heads beside each
    fine-tune and, per task, a data directory with the named .jsonl splits ({file: examples, or {task:
    examples}}) drawn from disjoint vocabularies, so the tasks' inputs are trivially separable.
    Returns (base, {task: fine-tune}, {task: data directory})."""
    from didi.datamodules.text import write_jsonl

    base, tasks = make_bert_zoo(root / "zoo")
    add_vocab(root / "zoo" / "base" / "0_Transformer")
    g = torch.Generator().manual_seed(5)
    data = {}
    for j, t in enumerate(tasks):
        save_file(
            {"weight": torch.randn(2, 32, generator=g), "bias": torch.randn(2, generator=g)},
            str(Path(tasks[t]) / "head.safetensors"),
        )
        vocab = WORDS[15 * j : 15 * (j + 1)]
        for name, n in splits.items():
            write_jsonl(root / "data" / t / name, random_texts(g, vocab, n[t] if isinstance(n, dict) else n))
        data[t] = str(root / "data" / t)
    return base, tasks, data
