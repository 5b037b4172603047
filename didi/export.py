"""Exports: hand an artifact to tools that know nothing of didi.

`checkpoint`: task t's full weights (θ0 + fold + shared + expert) in the base model's own layout: the same
file names, the same shards and `model.safetensors.index.json`, the same tensor names (hf_clip's renamed or
fused q/k/v tensors are written back under the checkpoint's names), plus config.json / tokenizer files where
the base had them. Each tensor is computed on its own and each shard written before the next is started, so
host memory stays at about one shard even for a sharded 8B model.

`peft`: one base checkpoint with everything every task shares folded in (θ0 + fold + A_sB_s + shared dense),
plus one PEFT LoRA adapter per task. didi stores a task's expert as A (m×r) @ B (r×n); PEFT computes
W + lora_B.weight @ lora_A.weight · lora_alpha/r, so lora_B.weight = A, lora_A.weight = B and lora_alpha = r
per module (`rank_pattern` and `alpha_pattern` carry each module's rank; scaling is exactly 1). Embeddings use
PEFT's `lora_embedding_A = Bᵀ`, `lora_embedding_B = Aᵀ`. A module where a task has rank 0 is left out of its
`target_modules`. Terms that are not low rank (dense deltas, masks: some baselines, the per_task non-matrix
policy) have no PEFT LoRA form and are refused by name.

Everything is written to a temporary directory and renamed into place at the end.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
from safetensors.torch import save_file

from didi import jsonio
from didi.artifact import (
    SHARED_FILE,
    Artifact,
    LazyTensors,
    LoRA,
    Term,
    atomic_dir,
    file_role,
    load_artifact,
    load_terms,
    parse_terms,
)
from didi.errors import DidiError
from didi.sources import require_path

ExportFormat = Literal["checkpoint", "peft"]

#: Small files of an HF model directory that travel with exported weights.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


# --------------------------------------------------------------------------------------- artifact terms
class LazyTerms:
    """The artifact's term files opened lazily and indexed by tensor name; one tensor's terms are read (and
    decoded by `didi.artifact`'s decoder, the one `Artifact.task_deltas` and routing use) at a time.

    Deltas are summed in the order `Artifact.task_deltas` uses (fold, shared, task, groups; keys in file
    order), so the exported weights equal `Artifact.task_state_dict` bit for bit."""

    def __init__(self, art: Artifact) -> None:
        self.art = art
        self._files: dict[str, LazyTensors] = {}
        self._index: dict[str, dict[str, list[str]]] = {}

    def _file(self, rel: str) -> LazyTensors:
        if rel not in self._files:
            f = LazyTensors(self.art.path / rel)
            idx: dict[str, list[str]] = {}
            for key in f:
                idx.setdefault(key.rsplit("::", 1)[0], []).append(key)
            self._files[rel], self._index[rel] = f, idx
        return self._files[rel]

    def names(self, rel: str) -> list[str]:
        self._file(rel)
        return list(self._index[rel])

    def check(self, files: Iterable[str]) -> None:
        """Parse every key of `files` (no tensor read): a bad term is refused before anything is written."""
        for rel in files:
            parse_terms(self._file(rel), self.art.path / rel, file_role(rel), refs=self._file(SHARED_FILE))

    def terms(self, rel: str, name: str) -> list[Term]:
        """The decoded terms of tensor `name` in file `rel`, in key order."""
        f = self._file(rel)
        keys = self._index[rel].get(name)
        if not keys:
            return []
        refs = self._file(SHARED_FILE)
        parsed = parse_terms(keys, self.art.path / rel, file_role(rel), present=f, refs=refs)
        return load_terms(parsed, f, refs).get(name, [])

    def delta(self, name: str, shape: tuple[int, ...], files: list[str]) -> torch.Tensor | None:
        """Sum of the terms of `name` in `files` (fp32, `shape`); None when no file has a term for it."""
        out = None
        for rel in files:
            for term in self.terms(rel, name):
                d = term.delta(shape)
                out = d if out is None else out + d
        return out


# ------------------------------------------------------------------------------------- base layout
def _resolve(src, name: str) -> list[tuple[str, int | None]]:
    """Checkpoint names holding the adapter's tensor `name`: [(raw name, chunk index of a fused q/k/v)]."""
    parts = getattr(src, "_parts", None)
    if parts is not None:  # hf_clip FusedQKVSource: rows q, k, v of one fused tensor
        if name in parts:
            return [(raw, i) for i, p in enumerate(parts[name]) for raw, _ in _resolve(src.src, p)]
        return _resolve(src.src, name)
    old = getattr(src, "_old", None)
    if old is not None:  # hf_clip RenamedSource
        return [(old[name], None)]
    return [(name, None)]


def _raw_source(src):
    while hasattr(src, "src"):
        src = src.src
    return src


class BaseLayout:
    """Files, shards and tensor names of θ0's checkpoint, mapped to the adapter's tensor names."""

    def __init__(self, src) -> None:
        self.src = src
        raw = _raw_source(src)
        self.path = Path(raw.path)
        self.pickled = raw.pickled
        self.sharded = self.path.is_dir() and (self.path / "model.safetensors.index.json").exists()
        files: dict[str, list[str]] = {}
        for rawname in raw.keys():
            f = raw.file_of(rawname)
            fname = "model.safetensors" if self.pickled else f.name
            files.setdefault(fname, []).append(rawname)
        self.files = files
        self.raw_dtype = {n: raw.dtype(n) for n in raw.keys()}
        self.to_adapter: dict[str, tuple[str, int | None]] = {}
        for name in src.keys():
            for rawname, chunk in _resolve(src, name):
                self.to_adapter[rawname] = (name, chunk)
        self.config_dir = self.path if self.path.is_dir() else self.path.parent
        self.has_config = (self.config_dir / "config.json").exists()

    @property
    def as_directory(self) -> bool:
        """Directory bases (HF models) export as directories; a single checkpoint file as one file."""
        return self.path.is_dir() or self.has_config

    def write(self, out: Path, value: Callable[[str], torch.Tensor]) -> None:
        """Write every tensor (`value(adapter name)`) under the checkpoint's own names, shard by shard; `out`
        is a directory (as_directory) or a file path."""
        cache: dict[str, torch.Tensor] = {}
        weight_map, total = {}, 0
        for fname, rawnames in self.files.items():
            tensors = {}
            for rawname in rawnames:
                name, chunk = self.to_adapter.get(rawname, (rawname, None))
                if name not in cache:
                    cache = {name: value(name)}  # keep one adapter tensor (a fused q/k/v serves 3 names)
                t = cache[name] if chunk is None else cache[name].chunk(3, dim=0)[chunk]
                tensors[rawname] = t.contiguous()
                weight_map[rawname] = fname
                total += t.numel() * t.element_size()
            target = out / fname if self.as_directory else out
            save_file(tensors, str(target), metadata={"format": "pt"})
            del tensors
        if self.sharded:
            (out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
            )
        if self.as_directory:
            for aux in AUX_FILES:
                if (self.config_dir / aux).exists():
                    shutil.copyfile(self.config_dir / aux, out / aux)


def _open(art: Artifact, base: str | None):
    adapter = art.adapter()
    src_info = art.manifest["sources"]["base"]
    path = base or src_info["path"]
    require_path(path, "base (θ0)")
    return adapter, adapter.open_source(path, src_info.get("allow_pickle", False))


def _shapes(art: Artifact) -> dict[str, tuple[int, ...]]:
    return {n: tuple(v["shape"]) for n, v in art.manifest["tensors"].items()}


def _check_tasks(art: Artifact, tasks: Iterable[str] | None) -> list[str]:
    tasks = list(tasks) if tasks else art.tasks
    bad = [t for t in tasks if t not in art.tasks]
    if bad:
        raise DidiError(f"{art.path}: unknown task {bad[0]!r}; tasks: {art.tasks}")
    return tasks


def _value_fn(src, shapes, terms: LazyTerms, files: list[str]) -> Callable[[str], torch.Tensor]:
    def value(name: str) -> torch.Tensor:
        w = src.get(name)
        if name not in shapes or not w.dtype.is_floating_point:
            return w
        d = terms.delta(name, shapes[name], files)
        return w if d is None else (w.float() + d).to(w.dtype)

    return value


# ---------------------------------------------------------------------------------------- checkpoint
def export_checkpoints(
    artifact: str | Path, output: str | Path, tasks: Iterable[str] | None = None, base: str | None = None
) -> Path:
    """Write each task's full weights in θ0's own format: OUTPUT/<task>/ (a directory base, shards and index
    included) or OUTPUT/<task>.safetensors (a single-file base)."""
    art = load_artifact(artifact)
    tasks = _check_tasks(art, tasks)
    _, src = _open(art, base)
    layout, shapes, terms = BaseLayout(src), _shapes(art), LazyTerms(art)
    _check_names(art, src)
    terms.check(["fold.safetensors", SHARED_FILE, *(rel for t in tasks for rel in art.expert_files(t))])
    with atomic_dir(output) as tmp:
        for t in tasks:
            files = ["fold.safetensors", SHARED_FILE, *art.expert_files(t)]
            target = tmp / t if layout.as_directory else tmp / f"{t}.safetensors"
            if layout.as_directory:
                target.mkdir()
            layout.write(target, _value_fn(src, shapes, terms, files))
        _write_info(
            tmp,
            art,
            "checkpoint",
            {t: (f"{t}" if layout.as_directory else f"{t}.safetensors") for t in tasks},
        )
    return Path(output)


def _check_names(art: Artifact, src) -> None:
    missing = sorted(set(art.manifest["tensors"]) - set(src.keys()))
    if missing:
        raise DidiError(
            f"{art.path}: base model {getattr(src, 'path', '')} lacks tensor '{missing[0]}' that the "
            f"artifact changes; pass the base the artifact was made from"
        )


def dequantized_note(art: Artifact, fmt: str) -> str | None:
    """What an export of `art` dequantizes, in words (None when its experts are stored in float32): the
    experts of a `--expert_dtype` merge are stored as codes and scales (int8, nf4) or in bfloat16
    (docs/method.md §9); every export decodes them to float32 factors first."""
    dtype = art.manifest.get("storage", {}).get("expert_dtype")
    if dtype in (None, "float32"):
        return None
    stored = {
        "int8": "int8 codes with float32 per-column (A) / per-row (B) scales",
        "nf4": "NF4 codes (two per byte) with float32 absmax scales per column (A) / row (B)",
        "bfloat16": "bfloat16 factors",
    }.get(dtype, dtype)
    where = (
        "float32 LoRA factors in each adapter (the base holds no expert)"
        if fmt == "peft"
        else "each task's weights as θ0 + fold + shared + A·B, in θ0's dtype"
    )
    return f"the experts are stored as {stored}; they were dequantized to {where}"


def _write_info(tmp: Path, art: Artifact, fmt: str, files: dict) -> None:
    info = {
        "format": fmt,
        "artifact": str(art.path.resolve()),
        "method": art.manifest.get("method", {}).get("name"),
        "storage_ratio": art.storage_ratio,
        "tasks": files,
    }
    note = dequantized_note(art, fmt)
    if note:
        info["dequantized"] = note
    (tmp / "export.json").write_text(jsonio.dumps(info, indent=1))


# ---------------------------------------------------------------------------------------------- PEFT
def _meta_model(adapter) -> torch.nn.Module:
    """The adapter's model on the meta device (module types and paths only, no weights)."""
    if hasattr(adapter, "create"):
        return adapter.create("meta")
    if hasattr(adapter, "hf_config"):
        from transformers import AutoModel

        with torch.device("meta"):
            return AutoModel.from_config(adapter.hf_config())
    raise DidiError(
        f"adapter '{adapter.registry_name}' has no model architecture; PEFT export needs a Hugging "
        f"Face model (hf_llama, hf_encoder, hf_clip); use --format checkpoint"
    )


def _peft_tensors(
    art: Artifact, terms: LazyTerms, task: str, adapter, model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT state dict and {module path: rank} of one task's expert (own low-rank terms + its groups')."""
    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for rel in art.expert_files(task):
        for name in terms.names(rel):
            for term in terms.terms(rel, name):
                if not isinstance(term, LoRA):
                    raise DidiError(
                        f"{art.path / rel}: task '{task}' stores a '{term.kind}' term for tensor "
                        f"'{name}' ('{name}::{term.kind}'), which is not low rank and has no PEFT LoRA "
                        f"form; export this artifact with --format checkpoint"
                    )
                A, B = factors.setdefault(name, ([], []))
                A.append(term.A.float())
                B.append(term.B.float())
    out, ranks = {}, {}
    shapes = _shapes(art)
    for name, (As, Bs) in factors.items():
        A, B = torch.cat(As, dim=1), torch.cat(Bs, dim=0)
        if A.shape[1] == 0:
            continue
        module_path, param = adapter.locate(name)
        try:
            module = model.get_submodule(module_path)
        except AttributeError as e:
            raise DidiError(
                f"tensor '{name}': no module '{module_path}' in the {type(model).__name__}"
            ) from e
        if param != "weight" or not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            raise DidiError(
                f"tensor '{name}' belongs to {type(module).__name__} '{module_path}' (parameter "
                f"'{param}'); PEFT LoRA export handles the weight of nn.Linear and nn.Embedding only; "
                f"use --format checkpoint"
            )
        if tuple(module.weight.shape) != shapes[name] or A.shape[0] * B.shape[1] != module.weight.numel():
            raise DidiError(
                f"tensor '{name}': factors {list(A.shape)} @ {list(B.shape)} do not give the shape "
                f"{list(module.weight.shape)} of '{module_path}'"
            )
        prefix = f"base_model.model.{module_path}"
        if isinstance(module, torch.nn.Linear):
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = B.contiguous(), A.contiguous()
        else:
            out[f"{prefix}.lora_embedding_A"], out[f"{prefix}.lora_embedding_B"] = (
                A.T.contiguous(),
                B.T.contiguous(),
            )
        ranks[module_path] = int(A.shape[1])
    return out, ranks


def peft_config(ranks: dict[str, int], base_path: str):
    """LoraConfig of one task: exact module paths, per-module rank and alpha = rank (scaling exactly 1)."""
    from peft import LoraConfig

    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_path,
    )


def export_peft(
    artifact: str | Path, output: str | Path, tasks: Iterable[str] | None = None, base: str | None = None
) -> Path:
    """OUTPUT/base/ (θ0 + fold + shared, the base's layout) and OUTPUT/adapters/<task>/ (PEFT LoRA adapters).

    A task whose expert has rank 0 everywhere gets no adapter: its model is the exported base itself
    (export.json records this)."""
    art = load_artifact(artifact)
    tasks = _check_tasks(art, tasks)
    adapter, src = _open(art, base)
    model = _meta_model(adapter)
    terms = LazyTerms(art)
    _check_names(art, src)
    terms.check(["fold.safetensors", SHARED_FILE, *(rel for t in tasks for rel in art.expert_files(t))])
    adapters = {
        t: _peft_tensors(art, terms, t, adapter, model) for t in tasks
    }  # refuse before writing anything
    layout = BaseLayout(src)
    out = Path(output)
    with atomic_dir(out) as tmp:
        base_dir = tmp / "base"
        base_dir.mkdir()
        base_target = base_dir if layout.as_directory else base_dir / layout.path.name
        layout.write(base_target, _value_fn(src, _shapes(art), terms, ["fold.safetensors", SHARED_FILE]))
        final_base = (
            (out.resolve() / "base") if layout.as_directory else out.resolve() / "base" / layout.path.name
        )
        (tmp / "adapters").mkdir()
        listing = {}
        for t, (tensors, ranks) in adapters.items():
            if not ranks:
                listing[t] = None
                continue
            d = tmp / "adapters" / t
            d.mkdir()
            peft_config(ranks, str(final_base)).save_pretrained(str(d))
            save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
            listing[t] = f"adapters/{t}"
        _write_info(tmp, art, "peft", listing)
    return out


def export_artifact(
    artifact: str | Path,
    output: str | Path,
    format: ExportFormat = "checkpoint",
    tasks: Iterable[str] | None = None,
    base: str | None = None,
) -> Path:
    if format == "peft":
        return export_peft(artifact, output, tasks, base)
    if format == "checkpoint":
        return export_checkpoints(artifact, output, tasks, base)
    raise DidiError(f"export format: expected 'checkpoint' or 'peft', found {format!r}")


def export_library_point(
    library: str | Path,
    output: str | Path,
    format: str = "artifact",
    point: int | None = None,
    budget: float | None = None,
    tasks: Iterable[str] | None = None,
    base: str | None = None,
) -> Path:
    """One front point of a MERGE library (`point`: its index in front.json, or the most accurate point within
    storage ratio `budget`): as a routed artifact (`format` artifact), or extracted to a temporary artifact
    and exported as `checkpoint` / `peft`."""
    import tempfile

    from didi.methods.merge_library import extract_point

    if format == "artifact":
        if tasks is not None or base is not None:
            raise DidiError("tasks / base: not used with --format artifact (the artifact holds every task)")
        return extract_point(library, output, point, budget)
    out = Path(output)
    if out.exists():
        raise DidiError(f"{out}: output directory already exists; choose another path or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.point-", dir=out.parent) as tmp:
        art = extract_point(library, Path(tmp) / "artifact", point, budget)
        chosen = load_artifact(art, verify=False).manifest["metrics"]["merge"]["point"]
        path = export_artifact(art, output, format, tasks, base)  # type: ignore[arg-type]
    info = json.loads((path / "export.json").read_text())  # name the library, not the deleted extraction
    info["artifact"] = {"library": str(Path(library).resolve()), "point": chosen}
    (path / "export.json").write_text(jsonio.dumps(info, indent=1))
    return path
