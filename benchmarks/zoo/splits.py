"""Splits of the zoo's tasks: deduplication, splits by document, balanced sampling and the overlap check.

An example is (text, label, group); the group is the document it comes from (a review, an episode, a chapter)
or, where a source has no documents, its own normalised text. Splits are made by group, so two sentences of
one document never land in two splits. Texts are compared after `normalise` (case, accents, punctuation and
spacing folded), so a re-punctuated copy counts as the same text.

The rules, in order:
  1. `dedupe`: a text that occurs in two groups, or with two labels, is dropped everywhere; copies inside one
     group keep the first.
  2. `assign_groups`: each group goes to test, val or train by a hash of (corpus key, seed, group) against
     the fractions; two tasks drawn from one corpus use the same key, so a text or document is in the same
     split for both, whatever else each keeps.
  3. `balanced_sample`: per split, up to the split's cap, the same number of examples of every class in the
     test and val splits (chance is 1 / classes), as many as each class allows in train.
  4. `decontaminate`: texts of one task's test split are removed from every other task's train and val.
  5. `check_splits`: refuses (ZooDataError naming the task, the splits and an example) any text shared by two
     splits of a task or by one task's test split and another task's train or val split, and any test or val
     split smaller than asked.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

SPLITS = ("train", "val", "test")


class ZooDataError(Exception):
    """The zoo's data cannot be built as asked (overlapping splits, too few examples, a missing source)."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    group: str = ""


_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    """Lower case, accents and punctuation folded, runs of anything else one space: the key texts are
    compared by."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    return _NON_WORD.sub(" ", t).strip()


def grouped(examples: Iterable[Example]) -> list[Example]:
    """Examples without a group get their normalised text as group (a source with no documents)."""
    return [e if e.group else Example(e.text, e.label, "text:" + normalise(e.text)) for e in examples]


def dedupe(examples: Sequence[Example]) -> tuple[list[Example], int]:
    """Drop texts that occur in more than one group or with more than one label (all their copies), and
    repeated copies inside one group; returns (kept, dropped). Empty normalised texts are dropped too."""
    groups: dict[str, set[str]] = {}
    labels: dict[str, set[int]] = {}
    for e in examples:
        k = normalise(e.text)
        groups.setdefault(k, set()).add(e.group)
        labels.setdefault(k, set()).add(e.label)
    seen: set[str] = set()
    kept = []
    for e in examples:
        k = normalise(e.text)
        if not k or len(groups[k]) > 1 or len(labels[k]) > 1 or k in seen:
            continue
        seen.add(k)
        kept.append(e)
    return kept, len(examples) - len(kept)


def assign_groups(
    groups: Iterable[str], test_fraction: float, val_fraction: float, seed: int, key: str
) -> dict[str, str]:
    """{group: split}: each group's place is a hash of (key, seed, group) read as a number u in [0, 1): test
    if u < test_fraction, val if u < test_fraction + val_fraction, else train. A group's split depends on
    nothing else, so tasks drawn from one corpus under one key put a shared text or document in the same
    split whatever each task keeps; the fractions hold in expectation."""
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ZooDataError(
            f"split fractions: test {test_fraction} and val {val_fraction} must be in (0, 1) and sum below 1"
        )
    out = {}
    for g in set(groups):
        u = int.from_bytes(hashlib.sha256(f"{key}/{seed}/{g}".encode()).digest()[:8], "big") / 2.0**64
        out[g] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return out


def balanced_sample(
    examples: Sequence[Example], cap: int, num_classes: int, seed: int, exact: bool = False
) -> list[Example]:
    """Up to cap // num_classes examples of each class, seeded, shuffled. `exact`: the same number of every
    class (the smallest class's count where one has fewer), so that chance is 1 / num_classes; otherwise a
    short class just gives fewer."""
    rng = random.Random(seed)
    by_class: dict[int, list[Example]] = {c: [] for c in range(num_classes)}
    for e in examples:
        by_class[e.label].append(e)
    per_class = cap // num_classes
    if exact:
        per_class = min(per_class, *(len(v) for v in by_class.values()))
    out = []
    for c in range(num_classes):
        xs = list(by_class[c])
        rng.shuffle(xs)
        out += xs[:per_class]
    rng.shuffle(out)
    return out


@dataclass(frozen=True)
class SplitPlan:
    """How one task is split: fractions of its groups, caps on each split's size, the corpus key."""

    test_fraction: float = 0.2
    val_fraction: float = 0.1
    n_test: int = 600
    n_val: int = 300
    n_train: int = 1000
    key: str = ""


def split_task(
    name: str, examples: Sequence[Example], num_classes: int, plan: SplitPlan, seed: int
) -> dict[str, list[Example]]:
    """{train, val, test} of one task: dedupe, assign groups, sample each split balanced per class."""
    for e in examples:
        if not 0 <= e.label < num_classes:
            raise ZooDataError(
                f"task {name!r}: label {e.label} outside [0, {num_classes}) in {e.text[:60]!r}"
            )
    exs, _ = dedupe(grouped(examples))
    where = assign_groups(
        (e.group for e in exs), plan.test_fraction, plan.val_fraction, seed, plan.key or name
    )
    caps = {"train": plan.n_train, "val": plan.n_val, "test": plan.n_test}
    out = {}
    for i, s in enumerate(SPLITS):
        chosen = [e for e in exs if where[e.group] == s]
        out[s] = balanced_sample(chosen, caps[s], num_classes, seed + i, exact=s != "train")
    return out


def decontaminate(tasks: dict[str, dict[str, list[Example]]]) -> dict[str, int]:
    """Remove from every task's train and val the texts of any other task's test split; {task: removed}."""
    test_keys = {t: {normalise(e.text) for e in s["test"]} for t, s in tasks.items()}
    removed = {}
    for t, s in tasks.items():
        others = set().union(*(k for u, k in test_keys.items() if u != t)) if len(tasks) > 1 else set()
        n = 0
        for split in ("train", "val"):
            kept = [e for e in s[split] if normalise(e.text) not in others]
            n += len(s[split]) - len(kept)
            s[split] = kept
        removed[t] = n
    return removed


def check_splits(
    tasks: dict[str, dict[str, Sequence[Example]]], min_test: int = 400, min_val: int = 100
) -> None:
    """Refuse overlapping or undersized splits: ZooDataError naming the task(s), the splits and an example.

    Inside a task no text may be in two of train/val/test; across tasks no text of one task's test split may
    be in another task's train or val split. Every test split needs `min_test` examples, every val split
    `min_val`, every train split one per class at least (checked by the caller through its labels)."""
    keys = {
        t: {s: {normalise(e.text): e.text for e in exs} for s, exs in splits.items()}
        for t, splits in tasks.items()
    }
    for t, ks in keys.items():
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1 :]:
                shared = sorted(set(ks.get(a, {})) & set(ks.get(b, {})))
                if shared:
                    raise ZooDataError(
                        f"task {t!r}: {len(shared)} text(s) in both its {a} and {b} splits, "
                        f"e.g. {ks[a][shared[0]]!r}"
                    )
    for t, ks in keys.items():
        test = set(ks.get("test", {}))
        for u, other in keys.items():
            if u == t:
                continue
            for s in ("train", "val"):
                shared = sorted(test & set(other.get(s, {})))
                if shared:
                    raise ZooDataError(
                        f"task {t!r} test split and task {u!r} {s} split share {len(shared)} text(s), "
                        f"e.g. {ks['test'][shared[0]]!r}"
                    )
    for t, splits in tasks.items():
        for s, need in (("test", min_test), ("val", min_val)):
            n = len(splits.get(s, ()))
            if n < need:
                raise ZooDataError(
                    f"task {t!r}: its {s} split has {n} examples, fewer than the {need} required"
                )
