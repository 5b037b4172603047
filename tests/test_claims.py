"""Every figure BENCHMARKS.md quotes is in the results file its section names.

A section (a `## ` heading up to the next) names its results as paths under `benchmarks/results/`: files
(`closed_form.{json,md}` expands to both) or directories (every .md and .json below them). Each figure of the
section's prose and tables must then be one of the numbers stored there, to the precision shown: a quoted
0.2321 matches a stored 0.23210xxx, 2,666× a stored 2666.4, 1.9e-7 a stored 1.911e-07, 6.8 % a stored 6.8
(not 0.068: a percentage is matched as written, or a fraction would match too easily).

What counts as a figure: a number with a decimal point, a thousands comma, an exponent, or a × / x / %
attached (1.0211×, 4x, 7 %). Plain integers are counts and sizes (12 blocks, 8 tasks, batch 64), not
measurements. A section with a figure must name at least one results file.

Skip rules (each keeps out text that is not a measurement):
- commands: fenced code blocks and `inline code` are the command lines and option values; the numbers in
  them (budgets, widths, steps) are the commands' inputs, so a figure equal to one is skipped as well
  (`--budgets '[1.02, 1.05]'` makes the table's 1.02 and 1.05 budget column inputs);
- names and versions: digits glued to a letter, `-`, `/` or `_` (ViT-B/32, Llama-3.1-8B, refine_w64, fp32)
  and dotted versions (torch 2.14.1) are not numbers;
- section references: a number after a section sign (docs/method.md section 5.3);
- images: `![...](...)` lines;
- goals: a figure right after the word "goal" is the target a benchmark was set, not a result;
- derived figures: a × or % figure that is the ratio (a/b) or the relative change (|a/b − 1|) of two figures
  quoted in the same sentence or table row, to the precision shown (interval arithmetic over the rounding
  of a and b), e.g. "7 % more error (0.302 vs 0.283)"; a and b are checked in their own right.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
#: sections whose results are being re-run; the figures are checked, a mismatch is an expected failure until
#: the text is updated (remove the entry then)
PENDING: dict[str, str] = {}


def pending(title: str) -> str | None:
    """The reason a section's check is expected to fail for now (titles match by their start)."""
    return next((why for start, why in PENDING.items() if title.startswith(start)), None)


#: a results path: benchmarks/results/ then path characters, braces and commas for {a,b} alternatives
RESULTS_PATH = re.compile(r"benchmarks/results/(?:[\w.\-/]|\{[\w.,\-/]*\})+")
#: an exponent has at most 3 digits: a commit like 89e7367 is a name, not 89·10^7367
NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[−-]?\d{1,3})?"
#: a number not glued to a name (the look-behind), with its unit; a sign only after a space or bracket
FIGURE = re.compile(
    r"(?<![\w.\-/−§])(?P<sign>(?<=[\s(|≈~])[−-])?(?P<num>" + NUMBER + r")"
    r"(?P<unit>×(?!\d)|x(?![\w])|\s?%)?(?![\w]|\.\d)"
)
VERSION = re.compile(r"\d+\.\d+\.\d+")
#: a number anywhere in a results file (JSON text or markdown)
STORED = re.compile(r"[−-]?\d+(?:\.\d+)?(?:[eE][−+-]?\d+)?")


@dataclass(frozen=True)
class Figure:
    """One quoted figure: its text, value and the half-width of its rounding interval."""

    text: str
    value: float
    tol: float
    unit: str

    @staticmethod
    def parse(num: str, sign: str = "", unit: str = "") -> "Figure":
        plain = num.replace(",", "")
        mant, _, exp = plain.partition("e")
        decimals = len(mant.split(".")[1]) if "." in mant else 0
        scale = 10 ** int(exp.replace("−", "-")) if exp else 1
        value = float(mant) * scale * (-1 if sign else 1)
        return Figure(f"{sign}{num}{unit}", value, 0.5 * 10**-decimals * scale * (1 + 1e-9), unit.strip())

    def matches(self, stored: float) -> bool:
        return abs(stored - self.value) <= self.tol


def is_figure(num: str, unit: str | None) -> bool:
    return bool(unit) or "." in num or "," in num or "e" in num


def sections(markdown: str) -> list[tuple[str, str]]:
    """(title, body) of each `## ` section; the text before the first is titled ''."""
    parts = re.split(r"^## +(.+)$", markdown, flags=re.M)
    return [("", parts[0])] + list(zip(parts[1::2], parts[2::2]))


def expand(path: str) -> list[str]:
    """`a/{b,c}/d` → [`a/b/d`, `a/c/d`] (one level of braces, as the text writes them)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path.rstrip(".,;:)")]
    return [q for alt in m.group(1).split(",") for q in expand(path[: m.start()] + alt + path[m.end() :])]


def results_files(body: str, root: Path = ROOT) -> list[Path]:
    """The results files a section names (a directory: every .md and .json below it)."""
    out: list[Path] = []
    for ref in RESULTS_PATH.findall(body):
        for p in expand(ref):
            path = root / p
            if not path.exists():
                raise AssertionError(f"names {p}, which does not exist")
            if path.is_dir():
                out += sorted(f for f in path.rglob("*") if f.suffix in (".md", ".json"))
            elif path.suffix in (".md", ".json"):  # a plot (pareto.png) holds no numbers to read
                out.append(path)
    return out


def stored_numbers(files: list[Path]) -> list[float]:
    nums = []
    for f in files:
        for s in STORED.findall(f.read_text()):
            try:
                nums.append(float(s.replace("−", "-")))
            except ValueError:
                pass
    return nums


def split_prose(body: str) -> tuple[list[str], list[str]]:
    """(units, inputs): the sentences and table rows that quote figures, and the text of the commands."""
    inputs = re.findall(r"```.*?```", body, flags=re.S)
    body = re.sub(r"```.*?```", " ", body, flags=re.S)
    inputs += re.findall(r"`[^`\n]*`", body)
    body = re.sub(r"`[^`\n]*`", " ", body)
    units = []
    for para in re.split(r"\n\s*\n", body):
        lines = [ln for ln in para.splitlines() if not ln.lstrip().startswith("![")]
        rows = [ln for ln in lines if ln.lstrip().startswith("|")]
        units += rows
        prose = " ".join(ln.strip() for ln in lines if ln not in rows)
        units += [s for s in re.split(r"(?<=[.;!?])\s+|\s+-\s+|^-\s+", prose) if s.strip()]
    return units, inputs


def figures_in(unit: str) -> list[tuple[Figure, int]]:
    """The figures of one sentence or row, with their positions; versions, goals and § numbers removed."""
    unit = VERSION.sub(" ", unit)
    out = []
    for m in FIGURE.finditer(unit):
        if not is_figure(m.group("num"), m.group("unit")):
            continue
        if re.search(r"goal\W*$", unit[: m.start()], flags=re.I):
            continue
        out.append((Figure.parse(m.group("num"), m.group("sign") or "", m.group("unit") or ""), m.start()))
    return out


def derived(fig: Figure, others: list[Figure]) -> bool:
    """`fig` (× or %) is a ratio or relative change of two other figures, over their rounding intervals."""
    if fig.unit not in ("×", "%"):
        return False
    lo_v, hi_v = abs(fig.value) - fig.tol, abs(fig.value) + fig.tol
    for a, b in itertools.permutations([o for o in others if o is not fig and o.value > 0], 2):
        lo = (a.value - a.tol) / (b.value + b.tol)
        hi = (a.value + a.tol) / max(b.value - b.tol, 1e-300)
        if fig.unit == "%":  # relative change in percent, either direction
            cands = [(100 * (lo - 1), 100 * (hi - 1)), (100 * (1 - hi), 100 * (1 - lo))]
        else:
            cands = [(lo, hi)]
        if any(c_lo <= hi_v and lo_v <= c_hi for c_lo, c_hi in cands):
            return True
    return False


def unmatched(body: str, root: Path = ROOT) -> tuple[list[Path], list[str]]:
    """(results files named, `figure in: sentence` for every figure no rule accounts for)."""
    files = results_files(body, root)
    stored = stored_numbers(files)
    units, inputs = split_prose(body)
    input_vals = [float(s.replace(",", "")) for s in re.findall(NUMBER, " ".join(inputs)) if "e" not in s]
    bad = []
    for unit in units:
        figs = figures_in(unit)
        for fig, _ in figs:
            if any(fig.matches(v) for v in input_vals):
                continue
            if any(fig.matches(v) for v in stored):
                continue
            if derived(fig, [f for f, _ in figs]):
                continue
            bad.append(f"{fig.text} in: {unit.strip()[:160]}")
    return files, bad


# --------------------------------------------------------------------------------------- the matcher
def test_matcher_finds_a_wrong_figure(tmp_path):
    """A hand-made section: the right figures pass (rounding, thousands comma, ×, %, an input, a derived
    ratio), one wrong figure is reported, and a section without a results file names none."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text(
        json.dumps({"err": 0.23210456, "speedup": 2666.4, "share": 6.1, "t": [1.9107e-07, 1.0211]})
    )
    (tmp_path / "benchmarks" / "results" / "x.md").write_text("| a | b |\n|---|---|\n| 0.302 | 0.283 |\n")
    good = (
        "`python benchmarks/x.py --budget 1.24` on ViT-B/32 (torch 2.14.1), results in\n"
        "benchmarks/results/x.{json,md}: error 0.2321 at 1.24×, 2,666× faster, 1.9e-7 apart, 6.1 % of it,\n"
        "ends at 1.0211×. Uniform costs 7 % more (0.302 vs 0.283); goal ≥ 0.85×.\n\n"
        "| a | b |\n|---|---|\n| 0.302 | 0.283 |\n"
    )
    files, bad = unmatched(good, tmp_path)
    assert len(files) == 2 and bad == []
    files, bad = unmatched(good.replace("error 0.2321", "error 0.2331"), tmp_path)
    assert [b.split(" in:")[0] for b in bad] == ["0.2331"]
    _, bad = unmatched(good.replace("7 % more", "9 % more"), tmp_path)
    assert [b.split(" in:")[0] for b in bad] == ["9 %"]
    assert results_files("no results here: 0.5 s", tmp_path) == []


def test_figure_parsing():
    assert [f.text for f, _ in figures_in("Llama-3.1-8B, fp32, 2-D, refine_w64, §5.3, torch 2.14.1")] == []
    assert [f.text for f, _ in figures_in("commit 89e7367, 1.5e-06")] == ["1.5e-06"]
    assert [f.text for f, _ in figures_in("12 blocks, 48 × 8, 0.9 GB, 4x, −26 %, 1.0211×, 2,666×")] == [
        "0.9",
        "4x",
        "−26 %",
        "1.0211×",
        "2,666×",
    ]
    assert Figure.parse("2,666", unit="×").matches(2666.4) and not Figure.parse("2,666").matches(2667.0)
    assert Figure.parse("1.9e-7").matches(1.911e-07)


# --------------------------------------------------------------------------------------- BENCHMARKS.md
SECTIONS = sections(BENCHMARKS.read_text())


@pytest.mark.parametrize(
    "title,body",
    [
        pytest.param(
            t,
            b,
            id=re.sub(r"\W+", "_", t)[:48] or "preamble",
            marks=[pytest.mark.xfail(reason=pending(t))] if pending(t) else [],
        )
        for t, b in SECTIONS
    ],
)
def test_benchmarks_figures_are_in_the_named_results(title, body):
    files, bad = unmatched(body)
    units, _ = split_prose(body)
    if any(figures_in(u) for u in units):
        assert files, f"section '{title}' quotes figures but names no benchmarks/results/ file"
    assert not bad, (
        f"section '{title}': figures in none of {[str(f.relative_to(ROOT)) for f in files]}:\n"
        + "\n".join(bad)
    )
