"""MERGE's modular expert library (issue 13, item 4): the modules of every front configuration, each
(component, task group) stored once, and `front.json`, from which any front point is extracted as a routed
artifact.

    LIBRARY/
      manifest.json              format "didi-merge-library"; the zoo's keys as an artifact's (adapter,
                                 sources with per-tensor sha256, tasks, |θ0|, tensors) and its digest;
                                 the components (tensors, element count, the partition for every k); the
                                 modules (component, member tasks); storage of the library itself
                                 (`didi.accounting`: every module dense, once); the search's record; sha256
                                 of every file
      modules/<mid>.safetensors  one module: "<tensor>::dense" = the static merge of the group's task deltas
                                 over the component's tensors (a singleton: the task's exact delta)
      front.json                 the zoo digest and the front: per point its genome, partitions, module ids,
                                 storage ratio and validation accuracy (normalised and per task)
      search/                    fronts.csv (the front after every generation), front.png, evaluations.jsonl

A front point is extracted (`extract_point`, `didi export LIBRARY OUT --format artifact --point i | --budget
r`) by `didi.methods.merge_space.configuration_terms` over the library's modules — the function the search
evaluated — and written by `didi.artifact.write_artifact`, so it is an ordinary routed artifact whose ratio
the same accounting prices (the largest group of each component folded, the other groups stored once).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from safetensors.torch import load_file

from didi import jsonio
from didi.accounting import price_files, storage_report
from didi.artifact import atomic_dir, decode_terms, versions, write_artifact, zoo_manifest
from didi.backbones.base import Zoo
from didi.errors import DidiError
from didi.methods.merge_search import Point
from didi.methods.merge_space import Group, MergeSpace, configuration_terms, folded_index
from didi.sources import file_sha256
from didi.tensorfile import write_tensors

LIBRARY_FORMAT = "didi-merge-library"
FRONT_FORMAT = "didi-merge-front"
FORMAT_VERSION = 1


def is_library(path: str | Path) -> bool:
    """Whether `path` is a MERGE library (its manifest says so)."""
    mf = Path(path) / "manifest.json"
    try:
        return json.loads(mf.read_text()).get("format") == LIBRARY_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def point_entry(space: MergeSpace, p: Point, index: int, module_ids: dict[tuple[str, Group], str]) -> dict:
    """One front point as front.json lists it."""
    parts = space.partitions(p.genome)
    rec = p.record
    return {
        "index": index,
        "genome": {c.name: k for c, k in zip(space.components, p.genome)},
        "storage_ratio": p.storage,
        "accuracy": p.score,
        "average_accuracy": rec.get("average"),
        "tasks": rec.get("tasks", {}),
        "generation": p.generation,
        "partitions": space.named_partitions(p.genome),
        "modules": {c: [module_ids[(c, g)] for g in part] for c, part in parts.items()},
        "folded": {c: module_ids[(c, part[folded_index(part)])] for c, part in parts.items()},
    }


def write_library(
    output: str | Path,
    zoo: Zoo,
    sha256: dict[str, dict[str, str]],
    space: MergeSpace,
    front: Sequence[Point],
    hyper: dict,
    reference: dict,
    search: dict,
    search_files: dict[str, bytes],
) -> Path:
    """Write the library of `front` (its points sorted by storage) to `output`, atomically."""
    module_ids: dict[tuple[str, Group], str] = {}
    for p in front:
        for c, part in space.partitions(p.genome).items():
            for g in part:
                module_ids.setdefault((c, g), f"m{len(module_ids)}")
    points = [point_entry(space, p, j, module_ids) for j, p in enumerate(front)]
    front_doc = {
        "format": FRONT_FORMAT,
        "format_version": FORMAT_VERSION,
        "zoo_digest": space.digest,
        "tasks": space.tasks,
        "components": [c.name for c in space.components],
        "objectives": {
            "accuracy": "mean over tasks of validation accuracy / the fine-tune's validation accuracy",
            "storage_ratio": "1 + stored elements / |θ0| (didi.accounting)",
        },
        "reference": reference,
        "points": points,
    }
    with atomic_dir(output) as tmp:
        (tmp / "modules").mkdir()
        files = {}
        for (c, g), mid in module_ids.items():
            f = tmp / "modules" / f"{mid}.safetensors"
            write_tensors(f, {f"{n}::dense": v for n, v in space.module(c, g).items()})
            files[mid] = f
        (tmp / "front.json").write_text(jsonio.dumps(front_doc, indent=1))
        (tmp / "search").mkdir()
        for name, data in search_files.items():
            (tmp / "search" / name).write_bytes(data)
        manifest = {
            "format": LIBRARY_FORMAT,
            "format_version": FORMAT_VERSION,
            "method": {"name": "merge", "hyper_parameters": hyper},
            **zoo_manifest(zoo, sha256),
            "zoo_digest": space.digest,
            "components": {
                c.name: {
                    "tensors": c.tensors,
                    "numel": c.numel,
                    "partitions": [[[space.tasks[t] for t in g] for g in p] for p in c.partitions],
                }
                for c in space.components
            },
            "modules": {
                mid: {"component": c, "tasks": [space.tasks[t] for t in g]}
                for (c, g), mid in module_ids.items()
            },
            "storage": {
                **storage_report(price_files(files), space.base_params),
                "note": "the library itself: every module once, dense; a front point stores fewer",
            },
            "search": search,
            "files": {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "manifest.json").write_text(jsonio.dumps(manifest, indent=1))
    return Path(output)


# ------------------------------------------------------------------------------------------- reading
def read_library(path: str | Path, verify: bool = True) -> tuple[dict, dict]:
    """(manifest, front) of a library; refuses another format, a front of another zoo (its digest, tasks or
    components differ from the library's) and, with `verify`, any file whose sha256 is not the manifest's."""
    path = Path(path)
    mf = path / "manifest.json"
    try:
        manifest = json.loads(mf.read_text())
    except OSError:
        raise DidiError(f"{path}: not a MERGE library (no manifest.json)") from None
    except json.JSONDecodeError as e:
        raise DidiError(f"{mf}: corrupt manifest ({e})") from e
    if manifest.get("format") != LIBRARY_FORMAT:
        raise DidiError(
            f"{mf}: format {manifest.get('format')!r} is not a MERGE library's ({LIBRARY_FORMAT})"
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DidiError(f"{mf}: library format version {manifest['format_version']} is newer than this didi")
    fp = path / "front.json"
    try:
        front = json.loads(fp.read_text())
    except OSError:
        raise DidiError(f"{path}: the library has no front.json") from None
    except json.JSONDecodeError as e:
        raise DidiError(f"{fp}: corrupt front ({e})") from e
    check_front(front, manifest, fp)
    if verify:
        for rel, digest in manifest["files"].items():
            f = path / rel
            if not f.exists():
                raise DidiError(f"{path}: file {rel} listed in the manifest is missing")
            if file_sha256(f) != digest:
                raise DidiError(f"{f}: sha256 does not match the manifest (corrupt or modified)")
    return manifest, front


def check_front(front: dict, manifest: dict, where: str | Path) -> None:
    """A front belongs to the library's zoo: same format, zoo digest, tasks and components."""
    if not isinstance(front, dict) or front.get("format") != FRONT_FORMAT:
        raise DidiError(f"{where}: not a MERGE front (format {FRONT_FORMAT!r})")
    for key, mine in (
        ("zoo_digest", manifest["zoo_digest"]),
        ("tasks", manifest["tasks"]),
        ("components", list(manifest["components"])),
    ):
        if front.get(key) != mine:
            raise DidiError(
                f"{where}: a front of another zoo: its {key} is {front.get(key)!r}, the library's is {mine!r}"
            )


def choose_point(front: dict, point: int | None = None, budget: float | None = None) -> dict:
    """A front point by its index, or the most accurate one whose storage ratio is at most `budget` (on a
    front: the one with the largest ratio not above it)."""
    points = front["points"]
    if (point is None) == (budget is None):
        raise DidiError(
            f"point / budget: give exactly one: a front index (0..{len(points) - 1}) or a storage ratio"
        )
    if point is not None:
        if not isinstance(point, int) or not 0 <= point < len(points):
            raise DidiError(f"point: expected a front index in 0..{len(points) - 1}, found {point!r}")
        return points[point]
    fits = [p for p in points if p["storage_ratio"] <= float(budget) * (1 + 1e-12)]
    if not fits:
        low = min(p["storage_ratio"] for p in points)
        raise DidiError(f"budget: {budget} is below every front point (the smallest stores {low:.6g}×)")
    return max(fits, key=lambda p: (p["accuracy"], -p["storage_ratio"]))


def extract_point(
    library: str | Path, output: str | Path, point: int | None = None, budget: float | None = None
) -> Path:
    """Write front point `point` (or the best within `budget`) of a library as a routed didi artifact."""
    library = Path(library)
    manifest, front = read_library(library)
    chosen = choose_point(front, point, budget)
    tasks = manifest["tasks"]
    by_mid = {}

    def module(c: str, g: Group) -> dict:
        mid = chosen["modules"][c][chosen_groups[c].index(g)]
        if manifest["modules"][mid]["component"] != c:
            raise DidiError(f"{library}: module {mid} is not of component {c}")
        if mid not in by_mid:
            rel = f"modules/{mid}.safetensors"
            terms = decode_terms(load_file(str(library / rel)), library / rel, "expert")
            by_mid[mid] = {n: ts[0].value for n, ts in terms.items()}
        return by_mid[mid]

    chosen_groups = {
        c: [tuple(sorted(tasks.index(t) for t in g)) for g in part]
        for c, part in chosen["partitions"].items()
    }
    comps = [(c, spec["tensors"]) for c, spec in manifest["components"].items()]
    terms = configuration_terms(tasks, comps, chosen_groups, module)
    zoo_keys = ("adapter", "sources", "tasks", "base_params", "tensors")
    art_manifest = {
        "method": manifest["method"],
        **{k: manifest[k] for k in zoo_keys},
        "ranks": {},
        "storage": {"target_ratio": chosen["storage_ratio"]},
        "metrics": {
            "merge": {
                "library": str(library.resolve()),
                "point": chosen["index"],
                "genome": chosen["genome"],
                "partitions": chosen["partitions"],
                "validation_accuracy": chosen["accuracy"],
                "validation_tasks": chosen["tasks"],
            }
        },
    }
    return write_artifact(
        output, art_manifest, terms.fold, terms.shared, terms.per_task, groups=terms.groups or None
    )
