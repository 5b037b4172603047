"""The artifact: a directory anyone can use without didi's training code.

    manifest.json            format, adapter + settings, sources + sha256 of every tensor used, tasks,
                             method + hyper-parameters, ranks, storage breakdown and ratio, versions,
                             file sha256
    fold.safetensors         deltas folded into the stored base (every task; replaces base tensors, cost 0)
    shared.safetensors       terms every task adds: "<name>::lora_A" (m×r), "<name>::lora_B" (r×n),
                             "<name>::dense"
    tasks/<task>.safetensors terms of one task: lora pairs, "<name>::dense",
                             or "<name>::mask" + "<name>::scale" (scale · mask ⊙ shared "<name>::ref");
                             quantized experts (`--expert_dtype`): "<name>::lora_A.int8" / "lora_A.nf4"
                             codes + "<name>::lora_A.scale", the same for B (`didi.quantize`), decoded
                             to float32 factors on load
    groups/<gid>.safetensors (optional) terms shared by a SUBSET of the tasks (FlexMerge's task clusters):
                             lora pairs or "<name>::dense"; manifest["groups"][gid] lists the member tasks.
                             Each group file is stored (and priced) once, like shared.safetensors, and added
                             to its members.
    rank_heatmap.png         (DiDi) ranks per layer and matrix kind

Task t's weights: θ0[name] + fold + A_s B_s + A_t B_t + dense_t + scale_t·mask_t⊙ref (+ the terms of every
group containing t), reshaped to the tensor's shape. Written to a temporary directory and renamed into place
at the end. Terms are read in one place, `parse_terms`/`decode_terms` (typed `LoRA`, `Dense`, `Masked` terms
per tensor), which routing, export and `Artifact.task_deltas` all use: a key that its file may not hold is the
same DidiError everywhere. A mask's scale is in the mask's own file, its ref in shared.safetensors.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Container, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from didi import jsonio
from didi.accounting import Stored, base_bytes_of, price_files, storage_report
from didi.errors import DidiError
from didi.quantize import CODE_SUFFIXES, SCALE_SUFFIXES, dequantize_factor
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


def temp_sibling(path: Path, prefix: str = "") -> Path:
    """A fresh name beside `path` for the directory that becomes `path` when complete,
    PREFIX NAME.tmp-PID-NS-HOST: the pid and host say whose it is, so that `sweep_stale_temps` removes only
    those of dead processes."""
    return path.with_name(f"{prefix}{path.name}.tmp-{os.getpid()}-{time.time_ns()}-{socket.gethostname()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_temps(path: Path, prefix: str = "") -> list[Path]:
    """Remove the `temp_sibling`s of `path` left by processes of this host that no longer run (a kill -9, a
    power cut: their `finally` never ran); returns what was removed. A temporary directory of a live process,
    or of another host (a shared cache on a network file system), is left alone."""
    removed = []
    if not path.parent.is_dir():
        return removed
    host = socket.gethostname()
    for p in path.parent.glob(f"{prefix}{path.name}.tmp-*"):
        pid, _, rest = p.name.rpartition(".tmp-")[2].partition("-")
        _, _, owner = rest.partition("-")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `path` only if the block succeeds. Temporary
    directories that killed writers of `path` left behind are removed first."""
    path = Path(path)
    if path.exists():
        raise DidiError(f"{path}: output directory already exists; choose another path or delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path, ".")
    tmp = temp_sibling(path, ".")
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as e:  # a concurrent writer renamed its directory into place first
            if not path.exists():
                raise
            raise DidiError(
                f"{path}: written by another process while this one was writing it; that one is kept"
            ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def zoo_manifest(zoo, sha256: dict[str, dict[str, str]]) -> dict:
    """The manifest keys all methods share: adapter, sources with per-tensor sha256, tasks, |θ0|, tensors."""
    return {
        "adapter": {"name": zoo.adapter.registry_name, "settings": zoo.adapter.settings()},
        "sources": {
            "base": {
                "path": str(Path(zoo.base).resolve()),
                "allow_pickle": zoo.allow_pickle,
                "sha256": sha256["base"],
            },
            "tasks": {t: {"path": str(Path(p).resolve()), "sha256": sha256[t]} for t, p in zoo.tasks.items()},
        },
        "tasks": zoo.task_names,
        "base_params": zoo.base_params,
        "base_bytes": base_bytes_of(zoo.plan),
        "tensors": {
            p.name: {
                "shape": list(p.shape),
                "dtype": str(p.dtype).replace("torch.", ""),
                "matrix_shape": list(p.matrix_shape) if p.matrix_shape else None,
            }
            for p in zoo.plan
            if p.dtype.is_floating_point
        },
    }


# ------------------------------------------------------------------------------------------- artifact terms
# The one decoder of term files: routing, export and `Artifact.task_deltas` all read terms through
# `parse_terms`/`decode_terms`, so a key means the same thing (and a bad key fails the same way) everywhere.

#: What each kind of file may hold. "fold" files key dense deltas by the tensor name itself; "shared" holds
#: terms every task adds plus the "::ref" tensors task masks read; "expert" is a task's file or a group's.
FileRole = Literal["fold", "shared", "expert"]
TERM_KINDS: dict[str, tuple[str, ...]] = {
    "fold": (),
    "shared": ("lora_A", "lora_B", "dense", "ref"),
    "expert": ("lora_A", "lora_B", "dense", "mask", "scale", *CODE_SUFFIXES, *SCALE_SUFFIXES),
}
SHARED_FILE = "shared.safetensors"


@dataclass(frozen=True, eq=False)
class LoRA:
    """A (m×r) @ B (r×n): a low-rank delta; routing applies it without forming the product."""

    A: torch.Tensor
    B: torch.Tensor
    kind: ClassVar[str] = "lora"

    def delta(self, shape: Sequence[int]) -> torch.Tensor:
        return (self.A.float() @ self.B.float()).reshape(shape)


@dataclass(frozen=True, eq=False)
class Dense:
    """A delta stored as is (any shape with the tensor's element count)."""

    value: torch.Tensor
    kind: ClassVar[str] = "dense"

    def delta(self, shape: Sequence[int]) -> torch.Tensor:
        return self.value.float().reshape(shape)


@dataclass(frozen=True, eq=False)
class Masked:
    """scale · mask ⊙ ref: a task's mask (and scale) over a reference delta stored once in the shared file."""

    mask: torch.Tensor
    scale: torch.Tensor
    ref: torch.Tensor
    kind: ClassVar[str] = "mask"

    def delta(self, shape: Sequence[int]) -> torch.Tensor:
        return (self.scale.float() * self.mask.float() * self.ref.float()).reshape(shape)


Term = LoRA | Dense | Masked


@dataclass(frozen=True)
class TermKeys:
    """One term of one tensor by its keys, known before any tensor is read: `keys[0]` is the term's own key,
    the rest its companions (lora_B; or scale, then the "::ref" in shared.safetensors)."""

    kind: str
    name: str
    keys: tuple[str, ...]


def file_role(rel: str) -> FileRole:
    """The role of an artifact file from its path inside the artifact."""
    return "fold" if rel == "fold.safetensors" else "shared" if rel == SHARED_FILE else "expert"


def parse_terms(
    keys: Iterable[str],
    file: str | Path,
    role: FileRole,
    present: Container[str] | None = None,
    refs: Container[str] = (),
) -> dict[str, list[TermKeys]]:
    """Terms per tensor name, in key order (the order deltas are summed in), from keys alone.

    `keys`: the keys to parse (all of the file's, or one tensor's); `present`: every key of the file (default:
    `keys`), where companions are looked up; `refs`: the shared file's keys (a mask needs its "::ref" there).
    A key its file may not hold (an unknown kind), a missing companion or a companion without its term raises
    one DidiError naming the file and the key."""
    keys = list(keys)
    present = set(keys) if present is None else present
    out: dict[str, list[TermKeys]] = {}
    if role == "fold":
        for key in keys:
            out.setdefault(key, []).append(TermKeys("dense", key, (key,)))
        return out

    def need(key: str, other: str) -> str:
        if other not in present:
            raise DidiError(f"{file}: term '{key}' needs '{other}', which the file lacks")
        return other

    for key in keys:
        name, sep, kind = key.rpartition("::")
        if not sep or kind not in TERM_KINDS[role]:
            raise DidiError(
                f"{file}: unknown term kind '{kind if sep else ''}' in '{key}' (a {role} file holds "
                f"{', '.join(TERM_KINDS[role])})"
            )
        if kind == "lora_A":
            out.setdefault(name, []).append(TermKeys("lora", name, (key, need(key, f"{name}::lora_B"))))
        elif kind == "dense":
            out.setdefault(name, []).append(TermKeys("dense", name, (key,)))
        elif kind == "mask":
            if f"{name}::ref" not in refs:
                raise DidiError(
                    f"{file}: term '{key}' needs '{name}::ref' in {SHARED_FILE}, which is missing"
                )
            out.setdefault(name, []).append(
                TermKeys("mask", name, (key, need(key, f"{name}::scale"), f"{name}::ref"))
            )
        elif kind in CODE_SUFFIXES and CODE_SUFFIXES[kind][1] == "A":
            fmt = CODE_SUFFIXES[kind][0]
            b_keys = [f"{name}::{k}" for k, (f, w, _) in CODE_SUFFIXES.items() if f == fmt and w == "B"]
            b_key = next((k for k in b_keys if k in present), None)
            if b_key is None:
                raise DidiError(f"{file}: term '{key}' needs one of {b_keys}, which the file lacks")
            scales = (need(key, f"{name}::lora_A.scale"), need(key, f"{name}::lora_B.scale"))
            out.setdefault(name, []).append(TermKeys("qlora", name, (key, b_key, *scales)))
        elif kind == "lora_B":
            need(key, f"{name}::lora_A")
        elif kind == "scale":
            need(key, f"{name}::mask")
        elif kind in CODE_SUFFIXES or kind in SCALE_SUFFIXES:  # a quantized pair's B codes or scales
            heads = [f"{name}::{k}" for k, (_, w, _) in CODE_SUFFIXES.items() if w == "A"]
            if not any(h in present for h in heads):
                raise DidiError(
                    f"{file}: term '{key}' needs A's codes (one of {heads}), which the file lacks"
                )
    return out


def load_terms(
    parsed: Mapping[str, list[TermKeys]],
    tensors: Mapping[str, torch.Tensor],
    refs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, list[Term]]:
    """The typed terms of `parse_terms`'s result: tensors read from `tensors` (refs from `refs`)."""
    out: dict[str, list[Term]] = {}
    for name, specs in parsed.items():
        terms = out.setdefault(name, [])
        for s in specs:
            if s.kind == "lora":
                terms.append(LoRA(tensors[s.keys[0]], tensors[s.keys[1]]))
            elif s.kind == "qlora":  # quantized expert: dequantized to float32 factors here, once
                sa, sb = tensors[s.keys[2]], tensors[s.keys[3]]
                A = dequantize_factor(s.keys[0].rpartition("::")[2], tensors[s.keys[0]], sa)
                B = dequantize_factor(s.keys[1].rpartition("::")[2], tensors[s.keys[1]], sb)
                terms.append(LoRA(A, B))
            elif s.kind == "dense":
                terms.append(Dense(tensors[s.keys[0]]))
            else:
                terms.append(Masked(tensors[s.keys[0]], tensors[s.keys[1]], refs[s.keys[2]]))
    return out


def decode_terms(
    tensors: Mapping[str, torch.Tensor],
    file: str | Path,
    role: FileRole,
    refs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, list[Term]]:
    """Typed terms per tensor name of one term file (`parse_terms` on its keys, then its tensors)."""
    refs = {} if refs is None else refs
    return load_terms(parse_terms(tensors.keys(), file, role, refs=refs.keys()), tensors, refs)


def merge_terms(*parts: Mapping[str, list[Term]]) -> dict[str, list[Term]]:
    """Terms of several files per tensor name, in file order (the order their deltas are summed in)."""
    out: dict[str, list[Term]] = {}
    for part in parts:
        for name, terms in part.items():
            out.setdefault(name, []).extend(terms)
    return out


class LazyTensors(Mapping):
    """The tensors of one safetensors file, each read only when asked for (a missing file reads as empty)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = safe_open(str(self.path), framework="pt", device="cpu") if self.path.exists() else None
        self._keys = list(self._handle.keys()) if self._handle is not None else []
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def write_artifact(
    path: str | Path,
    manifest: dict,
    fold: dict[str, TensorLike],
    shared: dict[str, TensorLike],
    tasks: dict[str, dict[str, TensorLike]],
    extra_files: dict[str, bytes] | None = None,
    groups: dict[str, tuple[list[str], dict[str, TensorLike]]] | None = None,
) -> Path:
    """Write tensors + manifest atomically; fills in storage, file checksums and versions.

    Values may be `LazyTensor`s: each is loaded only while it is written, so writing a big artifact holds one
    tensor in memory. `groups` maps a group id to (member tasks, terms) for terms shared by a subset of the
    tasks."""
    path = Path(path)
    for gid, (members, _) in (groups or {}).items():
        bad = sorted(set(members) - set(manifest["tasks"]))
        if bad or not members or not gid.replace("_", "").replace("-", "").isalnum():
            raise DidiError(
                f"artifact group {gid!r}: needs a plain name and member tasks among "
                f"{manifest['tasks']}, found members {members}"
            )
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
        given = manifest.get("storage", {})
        manifest["storage"] = {
            **storage_report(
                price_files(files),
                manifest["base_params"],
                manifest.get("base_bytes"),
                given.get("priced_in", "elements"),
            ),
            **given,
        }
        manifest["files"] = {
            str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest["versions"] = versions()
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (tmp / "manifest.json").write_text(jsonio.dumps(manifest, indent=1))
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
            raise DidiError(
                f"{mf}: format version {self.manifest['format_version']} is newer than this didi "
                f"({FORMAT_VERSION}); upgrade didi"
            )
        if verify:
            problems = self.check_files(stop_at_first=True)
            if problems:
                raise DidiError(problems[0])

    def check_files(self, stop_at_first: bool = False) -> list[str]:
        """Every file the manifest lists, hashed against its sha256: one message per missing or changed file
        (each names the file), [] when all match. `didi inspect --verify` lists them all."""
        problems = []
        for rel, digest in self.manifest["files"].items():
            f = self.path / rel
            if not f.exists():
                problems.append(f"{self.path}: file {rel} listed in the manifest is missing")
            elif file_sha256(f) != digest:
                problems.append(f"{f}: sha256 does not match the manifest (corrupt or modified)")
            if problems and stop_at_first:
                break
        return problems

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
        self._check_task(task)
        return self._load(f"tasks/{task}.safetensors")

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise DidiError(f"{self.path}: unknown task {task!r}; tasks: {self.tasks}")

    def expert_files(self, task: str) -> list[str]:
        """Files whose terms `task` adds after fold and shared: its own, then every group containing it."""
        self._check_task(task)
        groups = [
            f"groups/{gid}.safetensors"
            for gid, members in self.manifest.get("groups", {}).items()
            if task in members
        ]
        return [f"tasks/{task}.safetensors", *groups]

    def group_terms(self, task: str) -> list[dict[str, torch.Tensor]]:
        """Terms of every group (tensors shared by a subset of the tasks) that contains `task`."""
        return [self._load(rel) for rel in self.expert_files(task)[1:]]

    def terms(self, rel: str, refs: Mapping[str, torch.Tensor] | None = None) -> dict[str, list[Term]]:
        """The decoded terms of one file (`rel` inside the artifact); `refs`: the shared file's tensors, which
        masks read (default: read lazily from shared.safetensors)."""
        role = file_role(rel)
        if role == "expert" and refs is None:
            refs = LazyTensors(self.path / SHARED_FILE)
        return decode_terms(self._load(rel), self.path / rel, role, refs)

    def common_terms(self) -> dict[str, list[Term]]:
        """Terms every task adds, per tensor name: fold, then shared."""
        return merge_terms(self.terms("fold.safetensors"), self.terms(SHARED_FILE))

    def expert_terms(
        self, task: str, refs: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, list[Term]]:
        """`task`'s own terms per tensor name: its file's, then its groups' (a group's terms count as its
        members' own)."""
        if refs is None:
            refs = LazyTensors(self.path / SHARED_FILE)
        return merge_terms(*(self.terms(rel, refs) for rel in self.expert_files(task)))

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name` as the manifest lists it (terms are reshaped to it)."""
        spec = self.manifest["tensors"].get(name)
        if spec is None:
            raise DidiError(f"{self.path}: term for tensor '{name}' that the manifest does not list")
        return tuple(spec["shape"])

    def _add(self, out: dict[str, torch.Tensor], terms: Mapping[str, list[Term]]) -> dict[str, torch.Tensor]:
        """Add every term's delta to `out` (fp32, the tensor's shape), in order."""
        for name, ts in terms.items():
            shape = self.shape_of(name)
            for term in ts:
                d = term.delta(shape)
                out[name] = out[name] + d if name in out else d
        return out

    def common_deltas(self) -> dict[str, torch.Tensor]:
        """name -> the delta every task shares: fold + shared low-rank + shared dense (fp32, the tensor's
        shape). Routed serving folds exactly this into the base weights once."""
        return self._add({}, self.common_terms())

    def task_deltas(self, task: str) -> dict[str, torch.Tensor]:
        """name -> full delta of `task` w.r.t. θ0 (fp32, the tensor's shape)."""
        return self._add(self.common_deltas(), self.expert_terms(task))

    def task_state_dict(
        self, task: str, base: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
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
        files = {
            "shared": self.path / "shared.safetensors",
            **{t: self.path / "tasks" / f"{t}.safetensors" for t in self.tasks},
        }
        if (self.path / "fold.safetensors").exists():
            files["fold"] = self.path / "fold.safetensors"
        for gid in self.manifest.get("groups", {}):
            files[f"group:{gid}"] = self.path / "groups" / f"{gid}.safetensors"
        return price_files(files)


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    return Artifact(path, verify=verify)
