"""The artifact: a directory anyone can use without didi's training code.

    manifest.json            format, adapter + settings, sources + sha256 of every tensor used, tasks,
                             method + hyper-parameters, ranks, storage breakdown and ratio, versions, file sha256
    fold.safetensors         deltas folded into the stored base (every task; replaces base tensors, cost 0)
    shared.safetensors       terms every task adds: "<name>::lora_A" (m×r), "<name>::lora_B" (r×n), "<name>::dense"
    tasks/<task>.safetensors terms of one task: lora pairs, "<name>::dense", or "<name>::mask" + "<name>::scale"
                             (scale · mask ⊙ shared "<name>::ref")
    groups/<gid>.safetensors (optional) terms shared by a SUBSET of the tasks (FlexMerge's task clusters): lora
                             pairs or "<name>::dense"; manifest["groups"][gid] lists the member tasks. Each group
                             file is stored (and priced) once, like shared.safetensors, and added to its members.
    rank_heatmap.png         (DiDi) ranks per layer and matrix kind

Task t's weights: θ0[name] + fold + A_s B_s + A_t B_t + dense_t + scale_t·mask_t⊙ref (+ the terms of every
group containing t), reshaped to the tensor's shape. Written to a temporary directory and renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from didi.accounting import Stored, price_files, storage_report
from didi.errors import DidiError
from didi.sources import file_sha256
from didi.tensorfile import TensorLike, write_tensors

FORMAT = "didi-artifact"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("didi-merging", "torch", "lightning", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `path` only if the block succeeds."""
    path = Path(path)
    if path.exists():
        raise DidiError(f"{path}: output directory already exists; choose another path or delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def zoo_manifest(zoo, sha256: dict[str, dict[str, str]]) -> dict:
    """The manifest keys every method shares: adapter, sources with per-tensor sha256, tasks, |θ0|, tensors."""
    return {
        "adapter": {"name": zoo.adapter.registry_name, "settings": zoo.adapter.settings()},
        "sources": {"base": {"path": str(Path(zoo.base).resolve()), "allow_pickle": zoo.allow_pickle,
                             "sha256": sha256["base"]},
                    "tasks": {t: {"path": str(Path(p).resolve()), "sha256": sha256[t]} for t, p in zoo.tasks.items()}},
        "tasks": zoo.task_names, "base_params": zoo.base_params,
        "tensors": {p.name: {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                             "matrix_shape": list(p.matrix_shape) if p.matrix_shape else None}
                    for p in zoo.plan if p.dtype.is_floating_point},
    }


def write_artifact(path: str | Path, manifest: dict, fold: dict[str, TensorLike], shared: dict[str, TensorLike],
                   tasks: dict[str, dict[str, TensorLike]], extra_files: dict[str, bytes] | None = None,
                   groups: dict[str, tuple[list[str], dict[str, TensorLike]]] | None = None) -> Path:
    """Write tensors + manifest atomically; fills in storage, file checksums and versions.

    Values may be `LazyTensor`s: each is loaded only while it is written, so writing a big artifact holds one
    tensor in memory. `groups` maps a group id to (member tasks, terms) for terms shared by a subset of the
    tasks."""
    path = Path(path)
    for gid, (members, _) in (groups or {}).items():
        bad = sorted(set(members) - set(manifest["tasks"]))
        if bad or not members or not gid.replace("_", "").replace("-", "").isalnum():
            raise DidiError(f"artifact group {gid!r}: needs a plain name and member tasks among "
                            f"{manifest['tasks']}, found members {members}")
    with atomic_dir(path) as tmp:
        files: dict[str, Path] = {}
        (tmp / "tasks").mkdir()
        if fold:
            write_tensors(tmp / "fold.safetensors", fold)
            files["fold"] = tmp / "fold.safetensors"
        write_tensors(tmp / "shared.safetensors", shared)
        files["shared"] = tmp / "shared.safetensors"
        for t in manifest["tasks"]:
            f = tmp / "tasks" / f"{t}.safetensors"
            write_tensors(f, tasks.get(t, {}))
            files[t] = f
        if groups:
            (tmp / "groups").mkdir()
            for gid, (_, terms) in groups.items():
                write_tensors(tmp / "groups" / f"{gid}.safetensors", terms)
                files[f"group:{gid}"] = tmp / "groups" / f"{gid}.safetensors"
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = dict(manifest)
        manifest["format"], manifest["format_version"] = FORMAT, FORMAT_VERSION
        if groups:
            manifest["groups"] = {gid: list(members) for gid, (members, _) in groups.items()}
        manifest["storage"] = {**storage_report(price_files(files), manifest["base_params"]),
                               **manifest.get("storage", {})}
        manifest["files"] = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest["versions"] = versions()
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


class Artifact:
    """A loaded artifact: `task_state_dict(name)` rebuilds θ0 + shared + expert for one task."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise DidiError(f"{self.path}: not a didi artifact (no manifest.json)")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise DidiError(f"{mf}: corrupt manifest ({e})") from e
        if self.manifest.get("format") != FORMAT:
            raise DidiError(f"{mf}: format {self.manifest.get('format')!r} is not {FORMAT!r}")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise DidiError(f"{mf}: format version {self.manifest['format_version']} is newer than this didi "
                            f"({FORMAT_VERSION}); upgrade didi")
        if verify:
            for rel, digest in self.manifest["files"].items():
                f = self.path / rel
                if not f.exists():
                    raise DidiError(f"{self.path}: file {rel} listed in the manifest is missing")
                if file_sha256(f) != digest:
                    raise DidiError(f"{f}: sha256 does not match the manifest (corrupt or modified)")

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def storage_ratio(self) -> float:
        return float(self.manifest["storage"]["ratio"])

    def _load(self, rel: str) -> dict[str, torch.Tensor]:
        f = self.path / rel
        return load_file(str(f)) if f.exists() else {}

    def fold(self) -> dict[str, torch.Tensor]:
        return self._load("fold.safetensors")

    def shared(self) -> dict[str, torch.Tensor]:
        return self._load("shared.safetensors")

    def task_terms(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self.tasks:
            raise DidiError(f"{self.path}: unknown task {task!r}; tasks: {self.tasks}")
        return self._load(f"tasks/{task}.safetensors")

    def group_terms(self, task: str) -> list[dict[str, torch.Tensor]]:
        """Terms of every group (tensors shared by a subset of the tasks) that contains `task`."""
        return [self._load(f"groups/{gid}.safetensors") for gid, members in self.manifest.get("groups", {}).items()
                if task in members]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name` as the manifest lists it (terms are reshaped to it)."""
        spec = self.manifest["tensors"].get(name)
        if spec is None:
            raise DidiError(f"{self.path}: term for tensor '{name}' that the manifest does not list")
        return tuple(spec["shape"])

    def _add(self, out: dict[str, torch.Tensor], name: str, d: torch.Tensor) -> None:
        d = d.float().reshape(self.shape_of(name))
        out[name] = out[name] + d if name in out else d

    def common_deltas(self) -> dict[str, torch.Tensor]:
        """name -> the delta every task shares: fold + shared low-rank + shared dense (fp32, the tensor's shape).
        Routed serving folds exactly this into the base weights once."""
        out: dict[str, torch.Tensor] = {}
        for name, d in self.fold().items():
            self._add(out, name, d)
        shared = self.shared()
        for key, v in shared.items():
            name, kind = key.rsplit("::", 1)
            if kind == "lora_A":
                self._add(out, name, v.float() @ shared[f"{name}::lora_B"].float())
            elif kind == "dense":
                self._add(out, name, v)
            elif kind not in ("lora_B", "ref"):
                raise DidiError(f"{self.path}/shared.safetensors: unknown term kind '{kind}' in '{key}'")
        return out

    def task_deltas(self, task: str) -> dict[str, torch.Tensor]:
        """name -> full delta of `task` w.r.t. θ0 (fp32, the tensor's shape)."""
        out = self.common_deltas()
        shared, own = self.shared(), self.task_terms(task)
        for terms in (own, *self.group_terms(task)):
            for key, v in terms.items():
                name, kind = key.rsplit("::", 1)
                if kind == "lora_A":
                    self._add(out, name, v.float() @ terms[f"{name}::lora_B"].float())
                elif kind == "dense":
                    self._add(out, name, v)
                elif kind == "mask":
                    self._add(out, name, own[f"{name}::scale"].float() * v.float() * shared[f"{name}::ref"].float())
        return out

    def task_state_dict(self, task: str, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """θ0 + fold + shared + expert for `task`, in θ0's dtypes. θ0 is read through the recorded adapter
        from the recorded base path unless `base` (a state dict) is given."""
        deltas = self.task_deltas(task)
        if base is None:
            base = dict(self.open_base().items())
        out = {}
        for name, w in base.items():
            out[name] = (w.float() + deltas[name]).to(w.dtype) if name in deltas else w
        missing = sorted(set(deltas) - set(base))
        if missing:
            raise DidiError(f"{self.path}: base model lacks tensor '{missing[0]}' that the artifact changes")
        return out

    def adapter(self):
        from didi.backbones import build_adapter

        a = self.manifest["adapter"]
        return build_adapter(a["name"], a["settings"])

    def open_base(self):
        src = self.manifest["sources"]["base"]
        return self.adapter().open_source(src["path"], src.get("allow_pickle", False))

    def stored(self) -> list[Stored]:
        files = {"shared": self.path / "shared.safetensors",
                 **{t: self.path / "tasks" / f"{t}.safetensors" for t in self.tasks}}
        if (self.path / "fold.safetensors").exists():
            files["fold"] = self.path / "fold.safetensors"
        for gid in self.manifest.get("groups", {}):
            files[f"group:{gid}"] = self.path / "groups" / f"{gid}.safetensors"
        return price_files(files)


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    return Artifact(path, verify=verify)
