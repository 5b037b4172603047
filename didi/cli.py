"""The `didi` command line: every subcommand is a typed function, so its signature is the CLI and the YAML.

    didi merge --base θ0 --tasks '{a: a.safetensors, b: b.safetensors}' --budget S --output merged/
    didi merge --config configs/merge_synthetic.yaml
    didi inspect merged/ --json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal, Optional, Union

from didi.backbones import Adapter, Zoo
from didi.decompose import DecomposeConfig
from didi.errors import DidiError
from didi.pipeline import TrainerConfig
from didi.refine import RefineConfig
from didi.search import SearchConfig

EXAMPLES = """
examples:
  didi demo                                              # synthetic zoo, merged at 1.24x, in ~1 minute
  didi merge --base base.safetensors --tasks '{cars: cars.safetensors, dtd: dtd.safetensors}' \\
             --budget S --output merged/
  didi merge --config configs/merge_synthetic.yaml --budget 1.05 --output merged_105/
  didi merge ... --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu
  didi search ... --output ranks.json          then          didi refine ... --ranks ranks.json --output merged/
  didi inspect merged/ --json
"""


def _zoo(base: str, tasks, backbone, allow_pickle: bool):
    return Zoo(backbone if backbone is not None else Adapter(), base, tasks, allow_pickle=allow_pickle)


def merge(
    base: str,
    tasks: Union[dict[str, str], list[str]],
    output: str,
    budget: Union[float, str] = "S",
    backbone: Optional[Adapter] = None,
    allocation: Literal["search", "greedy", "uniform"] = "search",
    decompose: DecomposeConfig = DecomposeConfig(),
    search: SearchConfig = SearchConfig(),
    refine: RefineConfig = RefineConfig(),
    trainer: TrainerConfig = TrainerConfig(),
    allow_pickle: bool = False,
    resume: bool = False,
) -> Optional[str]:
    """Merge T fine-tunes of one backbone into θ0 + a shared low-rank module + one low-rank expert per task.

    Runs decompose → rank search (Lightning fit) → exact budget → LoRA refinement (Lightning fit) → artifact.

    Args:
        base: θ0: a .safetensors file or a directory (sharded index supported).
        tasks: {name: path} or a list of name=path / paths (name = file stem); at least two.
        output: artifact directory to create (written to a temporary path and renamed at the end).
        budget: storage ratio: S (1.24), M (1.4), L (2.0) or any float > 1.
        backbone: adapter (class name or path, e.g. `Adapter`; see `didi backbones`).
        allocation: `search` (DiDi's differentiable search), or the ablations `greedy` / `uniform`.
        decompose: decomposition settings (shared merge, max_rank, dtype, device, cache_dir).
        search: stage-1 settings.
        refine: stage-2 settings.
        trainer: Lightning Trainer settings (accelerator, devices, strategy, num_nodes, logger).
        allow_pickle: accept pickle checkpoints (loaded with torch.load(weights_only=True)).
        resume: continue the search from the last checkpoint of an interrupted run with the same output.
    """
    from didi.pipeline import run_merge

    zoo = _zoo(base, tasks, backbone, allow_pickle)
    path = run_merge(zoo, output, budget, decompose, search, refine, trainer, allocation, resume)
    if path is not None:
        _summary(path)
    return None


def search(
    base: str,
    tasks: Union[dict[str, str], list[str]],
    output: str,
    budget: Union[float, str] = "S",
    backbone: Optional[Adapter] = None,
    allocation: Literal["search", "greedy", "uniform"] = "search",
    decompose: DecomposeConfig = DecomposeConfig(),
    search: SearchConfig = SearchConfig(),
    trainer: TrainerConfig = TrainerConfig(),
    allow_pickle: bool = False,
    resume: bool = False,
) -> None:
    """Stage 1 alone: decompose, search and budget; writes the integer ranks to a JSON file (`output`).

    Resumable: with --resume true the search continues from `.<output>.work/search/last.ckpt`.
    """
    from didi.budget import parse_budget
    from didi.decompose import decompose as run_decompose
    from didi.pipeline import allocate, is_global_zero, precheck_budget, work_dir_for

    zoo = _zoo(base, tasks, backbone, allow_pickle)
    target = parse_budget(budget)
    precheck_budget(zoo, target)
    store = run_decompose(zoo, decompose)
    work = work_dir_for(output)
    ranks = allocate(store, target, search, trainer, zoo.adapter.nonmatrix_policy, allocation, work, resume)
    if is_global_zero():
        _write_json_atomic(output, ranks.to_json(store))
        print(f"ranks written to {output}: ratio {ranks.info['ratio']:.6g}, rel. error {ranks.info['rec_err']:.4g}")


def refine(
    base: str,
    tasks: Union[dict[str, str], list[str]],
    ranks: str,
    output: str,
    backbone: Optional[Adapter] = None,
    decompose: DecomposeConfig = DecomposeConfig(),
    refine: RefineConfig = RefineConfig(),
    trainer: TrainerConfig = TrainerConfig(),
    allow_pickle: bool = False,
) -> None:
    """Stage 2 alone: refine LoRA factors at the ranks of `didi search` and write the artifact.

    Resumable: matrices finished by an interrupted run (kept in `.<output>.work/refine/`) are not redone.
    """
    import shutil

    from didi.decompose import decompose as run_decompose
    from didi.pipeline import Ranks, is_global_zero, refine as run_refine, work_dir_for, write_didi_artifact

    zoo = _zoo(base, tasks, backbone, allow_pickle)
    if Path(output).exists():
        raise DidiError(f"{output}: output directory already exists; choose another path or delete it")
    dcfg, rcfg = decompose, refine
    store = run_decompose(zoo, dcfg)
    try:
        rk = Ranks.from_json(json.loads(Path(ranks).read_text()), store)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise DidiError(f"{ranks}: not a ranks file written by `didi search` ({e})") from e
    work = work_dir_for(output)
    shared, per_task, metrics = run_refine(zoo, store, rk, rcfg, trainer, work)
    if is_global_zero():
        from dataclasses import asdict

        hyper = {"budget": rk.info.get("target_ratio"), "allocation": rk.info.get("allocation"),
                 "decompose": asdict(dcfg), "refine": asdict(rcfg), "ranks_file": str(Path(ranks).resolve())}
        path = write_didi_artifact(output, zoo, store, rk, shared, per_task, hyper, metrics)
        shutil.rmtree(work, ignore_errors=True)
        _summary(path)


def inspect(path: str, json_output: bool = False) -> None:
    """Show an artifact's tasks, storage breakdown and ranks per tensor (`--json_output true` or `--json`)."""
    from didi.inspect import inspect_artifact

    print(inspect_artifact(path, as_json=json_output))


def demo(output: str = "didi_demo", budget: Union[float, str] = "S", tasks: int = 4, width: int = 64,
         layers: int = 4, seed: int = 0) -> None:
    """Build a small synthetic zoo with planted low-rank task vectors, merge it and print the result."""
    from didi.demo import run_demo

    run_demo(output, budget, tasks, width, layers, seed)


def _write_json_atomic(path: str, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, p)


def _summary(path) -> None:
    from didi.artifact import load_artifact

    a = load_artifact(path, verify=False)
    m = a.manifest
    ref = m["metrics"]["refine"]
    print(f"artifact: {path}\n  tasks: {', '.join(a.tasks)}\n  storage ratio: {a.storage_ratio:.6g} "
          f"(target {m['storage'].get('target_ratio')})\n  relative reconstruction error: "
          f"{ref['rec_err_before']:.4g} after search, {ref['rec_err_after']:.4g} after refinement")


COMMANDS = {"merge": merge, "search": search, "refine": refine, "inspect": inspect, "demo": demo}


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentParser, auto_cli

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--json_output=true" if a == "--json" else a for a in argv]
    try:
        auto_cli(COMMANDS, args=argv, description=__doc__.split("\n")[0], epilog=EXAMPLES,
                 parser_class=ArgumentParser, env_prefix="DIDI", default_env=False)
    except DidiError as e:
        print(f"didi: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
