"""Causal-LM evaluation data: per-task perplexity on text files, multiple-choice accuracy by log-likelihood.

A task's data is one of
  * a `.txt` file (or a directory with `<split>.txt`): perplexity. The file is tokenised once (with the
    tokenizer's BOS) and cut into non-overlapping windows of `max_length` tokens; in each window every token
    after the first is predicted from the ones before it. perplexity = exp(Σ NLL / predicted tokens); the
    report's `accuracy` for such a task is next-token top-1 accuracy and `n` the number of predicted tokens.
  * a `.jsonl` file (or `<split>.jsonl`) of {"context": str, "choices": [str, ...], "label": int}: the choice
    with the highest Σ log p(choice tokens | context) is the prediction (choices are tokenised without special
    tokens and appended to the context's tokens; write the leading space into the choice when the tokenizer
    needs it). `n` is the number of questions.

A batch holds one row per window or per (question, choice): `input_ids`, `attention_mask` (right padding),
`target_mask` (1 where the token is scored), `task_id` per row (what the router reads), `row_example`
(example of the row inside the batch), and per example `example_task`, `example_kind` (0 text, 1 choice),
`labels`. `didi.eval_causal_lm.CausalLMEvaluator` sums NLL, tokens and correct counts per task, so DDP
(disjoint `ShardSampler` shares, nothing padded) gives exactly the one-process numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from didi.datamodules.text import ShardedEvalDataModule, task_order_of
from didi.errors import DidiError

TEXT, CHOICE = 0, 1


def task_file(path: str | Path, split: str = "test") -> Path:
    p = Path(path)
    if p.is_dir():
        found = [p / f"{split}{suf}" for suf in (".txt", ".jsonl") if (p / f"{split}{suf}").exists()]
        if len(found) != 1:
            raise DidiError(
                f"{p}: expected exactly one of {split}.txt (perplexity) or {split}.jsonl (multiple "
                f"choice); found {[f.name for f in found]}"
            )
        p = found[0]
    if not p.exists():
        raise DidiError(f"{p}: no such data file")
    if p.suffix not in (".txt", ".jsonl"):
        raise DidiError(f"{p}: expected a .txt file (perplexity) or .jsonl of multiple-choice questions")
    return p


def read_choices(path: Path) -> list[dict]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            ctx, choices, label = ex["context"], ex["choices"], ex["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DidiError(
                f"{path}:{i + 1}: expected a JSON object with 'context', 'choices' and 'label' ({e})"
            ) from e
        if not isinstance(choices, list) or len(choices) < 2:
            raise DidiError(f"{path}:{i + 1}: 'choices' must be a list of at least two strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise DidiError(f"{path}:{i + 1}: label {label!r} is outside the {len(choices)} choices")
        out.append({"context": str(ctx), "choices": [str(c) for c in choices], "label": label})
    return out


class LMExamples(Dataset):
    """Items: (kind, task id, token ids of each row, scored-from position of each row, label)."""

    def __init__(self, items: list[tuple[int, int, list[list[int]], list[int], int]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate_lm(items: list, pad_id: int = 0) -> dict:
    rows, starts, row_task, row_example = [], [], [], []
    for j, (kind, task, ids, start, _) in enumerate(items):
        rows += ids
        starts += start
        row_task += [task] * len(ids)
        row_example += [j] * len(ids)
    L_ = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L_), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), L_), dtype=torch.long)
    target = torch.zeros((len(rows), L_), dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, starts)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        target[i, s : len(r)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "target_mask": target,
        "task_id": torch.tensor(row_task),
        "row_example": torch.tensor(row_example),
        "example_task": torch.tensor([it[1] for it in items]),
        "example_kind": torch.tensor([it[0] for it in items]),
        "labels": torch.tensor([it[4] for it in items]),
    }


class CausalLMDataModule(ShardedEvalDataModule):
    """Per-task perplexity windows and multiple-choice questions for a causal LM.

    Args:
        tasks: {task name: .txt / .jsonl file, or a directory with `<split>.txt` or `<split>.jsonl`}.
        tokenizer: directory of a Hugging Face tokenizer (usually θ0's).
        task_order: task names in the order their ids are numbered (the artifact's); default: `tasks`' order.
        split: file stem looked for inside directories.
        batch_size: windows or questions per batch (per process; a question brings one row per choice).
        max_length: tokens per window (perplexity) and per question + choice (the context is cut on the left).
        limit_per_task: keep only the first windows / questions of each task.
    """

    def __init__(
        self,
        tasks: dict[str, str],
        tokenizer: str,
        task_order: Sequence[str] | None = None,
        split: str = "test",
        batch_size: int = 8,
        max_length: int = 128,
        limit_per_task: int | None = None,
    ) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.task_order = task_order_of(self.tasks, task_order)
        if max_length < 2:
            raise DidiError(f"max_length: at least 2 tokens are needed to predict one, found {max_length}")
        self.tokenizer_path, self.split = tokenizer, split
        self.batch_size, self.max_length, self.limit = batch_size, max_length, limit_per_task
        self._tokenizer = None
        self.dataset: LMExamples | None = None
        self.kinds: dict[str, int] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from didi.datamodules.text import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def windows(self, text: str) -> list[list[int]]:
        ids = self.tokenizer(text)["input_ids"]
        out = [ids[i : i + self.max_length] for i in range(0, len(ids), self.max_length)]
        return [w for w in out if len(w) >= 2]

    def question(self, ex: dict, where: str) -> tuple[list[list[int]], list[int]]:
        tok = self.tokenizer
        ctx = tok(ex["context"])["input_ids"]
        rows, starts = [], []
        for c in ex["choices"]:
            cid = tok(c, add_special_tokens=False)["input_ids"]
            if not cid:
                raise DidiError(f"{where}: choice {c!r} has no tokens")
            if len(cid) >= self.max_length:
                raise DidiError(
                    f"{where}: choice {c!r} has {len(cid)} tokens, max_length is {self.max_length}"
                )
            keep = ctx[-(self.max_length - len(cid)) :]
            if not keep:
                raise DidiError(f"{where}: empty context; the first choice token needs one token before it")
            rows.append(keep + cid)
            starts.append(len(keep))
        return rows, starts

    def load(self) -> LMExamples:
        items = []
        for name, path in self.tasks.items():
            f = task_file(path, self.split)
            tid = self.task_order.index(name)
            if f.suffix == ".txt":
                self.kinds[name] = TEXT
                ws = self.windows(f.read_text(encoding="utf-8"))
                ws = ws[: self.limit] if self.limit is not None else ws
                task_items = [(TEXT, tid, [w], [1], -1) for w in ws]
            else:
                self.kinds[name] = CHOICE
                qs = read_choices(f)
                qs = qs[: self.limit] if self.limit is not None else qs
                task_items = []
                for i, q in enumerate(qs):
                    rows, starts = self.question(q, f"{f}:{i + 1}")
                    task_items.append((CHOICE, tid, rows, starts, q["label"]))
            if not task_items:
                raise DidiError(f"task {name!r}: the data ({f}) is empty (a text needs at least 2 tokens)")
            items += task_items
        return LMExamples(items)

    def counts(self) -> dict[str, int]:
        """Per task: predicted tokens (text) or questions (multiple choice)."""
        ds = self.dataset or self.load()
        out = {t: 0 for t in self.tasks}
        for kind, tid, rows, starts, _ in ds.items:
            out[self.task_order[tid]] += (len(rows[0]) - starts[0]) if kind == TEXT else 1
        return out

    def collate(self):
        return _Collate(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)


class _Collate:
    """Picklable collate with the pad id (DDP spawn)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list) -> dict:
        return collate_lm(items, self.pad_id)
