"""MERGE's bi-objective search (issue 13, item 3): NSGA-II (pymoo) over integer genomes, a surrogate that
pre-screens offspring, a fixed budget of real evaluations, and an on-disk cache of every real evaluation.

Objectives: maximise the accuracy score of a genome (a real evaluation; MERGE's is the mean normalised
validation accuracy of the routed model) and minimise its storage ratio (exact and cheap: the accounting needs
no evaluation). One generation:

 1. NSGA-II's mating (binary tournament, SBX crossover and polynomial mutation, rounded to integers; pymoo's
    `ask`) proposes `candidates` × `offspring` genomes, none of them in the population;
 2. genomes evaluated earlier in this search are dropped (they have competed already);
 3. the surrogate (a random forest or Gaussian process from scikit-learn, fitted on every real evaluation so
    far: genome → score) predicts each candidate's score; with the exact storage, NSGA-II's own survival
    (non-dominated rank, then crowding distance) picks `offspring` of them;
 4. those are evaluated for real, and only they are told to NSGA-II (`tell`), which keeps the best
    `population` of the population and the newcomers.

The surrogate only decides which candidates are evaluated: no predicted number ever enters the population,
the front or a report. The search stops when `evaluations` real evaluations are spent (the last generation
takes what is left) or when mating finds nothing new.

The front after every generation is the non-dominated set of *all* real evaluations so far (two genomes with
the same score and storage: the earlier one). Every real evaluation is appended to a JSON-lines cache keyed by
genome (`EvaluationCache`, first line: the header that says what was evaluated, so that a cache of another zoo
or other settings is refused). A resumed search replays the same seeded trajectory from the start, reading
known genomes from the cache, so it reaches the same front as an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from didi import jsonio
from didi.errors import DidiError
from didi.progress import stage_bar

Genome = tuple[int, ...]
SurrogateKind = Literal["random_forest", "gaussian_process", "none"]


# ------------------------------------------------------------------------------------------------ cache
class EvaluationCache:
    """Real evaluations on disk, one JSON line each: {"genome": [...], "record": {...}, "seconds": s}.

    The first line is {"header": ...}: what the evaluations depend on (the zoo's digest, the validation data,
    the merge settings). With `resume`, an existing cache must have the same header (else a DidiError naming
    the cache and the keys that differ) and its evaluations are reused; without, it is started afresh. A last
    line cut short by a kill is ignored; every line is flushed and fsynced as it is written."""

    def __init__(self, path: str | Path, header: dict, resume: bool) -> None:
        self.path = Path(path)
        self.header = json.loads(jsonio.dumps(header))
        self.records: dict[Genome, dict] = {}
        if resume and self.path.exists():
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(jsonio.dumps({"header": self.header}) + "\n")

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0])["header"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            head = None
        if head is None:
            raise DidiError(f"{self.path}: not an evaluation cache of MERGE's search (it has no header)")
        if head != self.header:
            keys = sorted(k for k in set(head) | set(self.header) if head.get(k) != self.header.get(k))
            raise DidiError(
                f"resume: {self.path} holds evaluations of another zoo or other settings (they differ in "
                f"{', '.join(keys)}); delete {self.path.parent} to start afresh"
            )
        for i, line in enumerate(lines[1:], 2):
            try:
                entry = json.loads(line)
                self.records[tuple(int(x) for x in entry["genome"])] = entry
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if i == len(lines):  # the line a kill cut short
                    break
                raise DidiError(f"{self.path}:{i}: corrupt evaluation record ({e})") from e
        # rewrite without a cut line, so that appends start on a fresh line
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(
            "".join(jsonio.dumps(x) + "\n" for x in [{"header": self.header}, *self.records.values()])
        )
        os.replace(tmp, self.path)

    def get(self, genome: Genome) -> dict | None:
        entry = self.records.get(tuple(genome))
        return None if entry is None else entry["record"]

    def put(self, genome: Genome, record: dict, seconds: float) -> None:
        entry = {"genome": list(genome), "record": record, "seconds": seconds}
        self.records[tuple(genome)] = json.loads(jsonio.dumps(entry))
        with self.path.open("a", encoding="utf-8") as f:
            f.write(jsonio.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------- settings
@dataclass
class SearchSettings:
    """The search's knobs (MERGE's options carry them; see `didi methods`)."""

    evaluations: int = 60
    population: int = 12
    offspring: int | None = None
    candidates: int = 4
    surrogate: SurrogateKind = "random_forest"
    seed: int = 0

    @property
    def per_generation(self) -> int:
        return self.offspring if self.offspring is not None else max(2, self.population // 2)

    def validate(self, space_size: int | None = None) -> None:
        for name in ("evaluations", "population", "candidates"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DidiError(f"{name}: expected a positive integer, found {v!r}")
        if self.population < 2:
            raise DidiError(f"population: NSGA-II needs at least 2 genomes, found {self.population}")
        if self.offspring is not None and (not isinstance(self.offspring, int) or self.offspring < 1):
            raise DidiError(f"offspring: expected a positive integer (or null), found {self.offspring!r}")
        if self.evaluations < self.population:
            raise DidiError(
                f"evaluations: the budget of real evaluations ({self.evaluations}) is below the population "
                f"size ({self.population}); the first generation alone evaluates every genome of the "
                f"population (raise evaluations or lower population)"
            )
        if self.surrogate not in ("random_forest", "gaussian_process", "none"):
            raise DidiError(
                f"surrogate: expected random_forest, gaussian_process or none, found {self.surrogate!r}"
            )
        if space_size is not None and self.population > space_size:
            raise DidiError(
                f"population: {self.population} genomes, but this zoo has only {space_size} configurations"
            )


def require_search_packages(surrogate: SurrogateKind = "random_forest") -> None:
    """pymoo (NSGA-II) and, for a surrogate, scikit-learn: the `merge` extra (`pip install
    didi-merging[merge]`); a clear error before any work when they are missing."""
    import importlib.util

    need = ["pymoo"] + (["sklearn"] if surrogate != "none" else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        pkgs = {"pymoo": "pymoo", "sklearn": "scikit-learn"}
        raise DidiError(
            f"merge: the search needs {' and '.join(pkgs[m] for m in missing)} (pip install "
            f"'didi-merging[merge]')"
        )


def make_surrogate(kind: SurrogateKind, seed: int):
    """A scikit-learn regressor genome → score (None for `none`: candidates are taken in mating order)."""
    if kind == "none":
        return None
    if kind == "random_forest":
        from sklearn.ensemble import RandomForestRegressor

        return RandomForestRegressor(n_estimators=100, random_state=seed, n_jobs=1)
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    kernel = ConstantKernel() * RBF(length_scale=1.0) + WhiteKernel(noise_level=1e-3)
    return GaussianProcessRegressor(kernel=kernel, normalize_y=True, random_state=seed)


# ----------------------------------------------------------------------------------------------- search
@dataclass
class Point:
    """One real evaluation: genome, score (higher is better), storage ratio, the generation that evaluated
    it, and the evaluation's record."""

    genome: Genome
    score: float
    storage: float
    generation: int
    record: dict


@dataclass
class SearchResult:
    points: list[Point]
    fronts: list[list[int]]  # per generation: indices into points
    fresh: int = 0  # evaluations run by this process (the rest came from the cache)
    cached: int = 0
    wall_s: float = 0.0
    stopped: str = ""
    history: list[dict] = field(default_factory=list)

    @property
    def front(self) -> list[Point]:
        return [self.points[i] for i in self.fronts[-1]] if self.fronts else []


def non_dominated(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates (score ≥, storage ≤, one strictly), sorted by storage;
    of several with the same score and storage, the first."""
    out = []
    seen: set[tuple[float, float]] = set()
    for i, p in enumerate(points):
        if (p.score, p.storage) in seen:
            continue
        dominated = any(
            q.score >= p.score and q.storage <= p.storage and (q.score > p.score or q.storage < p.storage)
            for q in points
        )
        if not dominated:
            out.append(i)
            seen.add((p.score, p.storage))
    return sorted(out, key=lambda i: (points[i].storage, -points[i].score))


def initial_genomes(n_var: int, upper: int, n: int, seed: int, first: Sequence[Genome] = ()) -> list[Genome]:
    """The first population: `first` (MERGE: every task exact, then one static merge), then genomes drawn
    with a density p ~ U(0, 1) each (k_c = 1 + Binomial(T − 1, p)), so that storage spreads from one model to
    T instead of piling up in the middle as with uniform k_c. Distinct and seeded."""
    rng = np.random.default_rng([seed, 7])
    out: list[Genome] = []
    for g in first:
        if tuple(g) not in out and len(out) < n:
            out.append(tuple(int(x) for x in g))
    tries = 0
    while len(out) < n and tries < 1000 * n:
        p = rng.uniform()
        g = tuple(int(x) for x in 1 + rng.binomial(upper - 1, p, size=n_var))
        if g not in out:
            out.append(g)
        tries += 1
    if len(out) < n:
        raise DidiError(f"population: could not draw {n} distinct genomes from the configuration space")
    return out


def search_front(
    n_var: int,
    upper: int,
    storage: Callable[[Genome], float],
    evaluate: Callable[[Genome], dict],
    score: Callable[[dict], float],
    settings: SearchSettings,
    cache: EvaluationCache,
    first: Sequence[Genome] = (),
    surrogate: Any = "default",
    on_generation: Callable[[int, SearchResult], None] | None = None,
    progress: bool = True,
) -> SearchResult:
    """NSGA-II with surrogate pre-screening over genomes in {1..upper}^n_var (see the module docstring).

    `evaluate(genome)` runs one real evaluation and returns its record (JSON-able); `score(record)` is the
    objective to maximise; `storage(genome)` the one to minimise. `surrogate`: "default" (the settings'
    kind), None, or any object with scikit-learn's fit/predict (tests pass a deliberately wrong one).
    `on_generation(gen, result)` runs after each generation (fronts to CSV, PNG, logger)."""
    from pymoo.algorithms.moo.nsga2 import NSGA2, RankAndCrowding
    from pymoo.core.population import Population
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.termination.max_gen import MaximumGenerationTermination

    t0 = time.perf_counter()
    settings.validate(upper**n_var)
    model = make_surrogate(settings.surrogate, settings.seed) if surrogate == "default" else surrogate
    res = SearchResult([], [])
    index: dict[Genome, int] = {}

    def real(g: Genome, gen: int) -> Point:
        rec = cache.get(g)
        if rec is None:
            s = time.perf_counter()
            rec = evaluate(g)
            cache.put(g, rec, time.perf_counter() - s)
            rec = cache.get(g)
            res.fresh += 1
        else:
            res.cached += 1
        p = Point(g, float(score(rec)), float(storage(g)), gen, rec)
        index[g] = len(res.points)
        res.points.append(p)
        return p

    P, m = settings.population, settings.per_generation
    problem = Problem(n_var=n_var, n_obj=2, xl=1, xu=upper, vtype=int)
    x0 = initial_genomes(n_var, upper, P, settings.seed, first)
    algo = NSGA2(
        pop_size=P,
        n_offsprings=settings.candidates * m,
        sampling=np.array(x0, dtype=float),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    algo.setup(problem, seed=settings.seed, termination=MaximumGenerationTermination(10**9), verbose=False)
    budget = settings.evaluations
    total_gens = 1 + -(-(budget - P) // m)
    bar = stage_bar("merge search generation", total_gens, disable=not progress)
    try:
        gen = 1
        pop = algo.ask()
        pts = [real(tuple(int(x) for x in row), gen) for row in pop.get("X")]
        pop.set("F", np.array([[-p.score, p.storage] for p in pts]))
        algo.tell(infills=pop)
        _end_generation(res, gen, bar, on_generation)
        while len(res.points) < budget:
            off = algo.ask()
            if off is None or len(off) == 0:
                res.stopped = "mating found no new genome"
                break
            rows = [tuple(int(x) for x in r) for r in off.get("X")]
            keep, seen = [], set()
            for i, g in enumerate(rows):
                if g not in index and g not in seen:
                    keep.append(i)
                    seen.add(g)
            if not keep:
                res.stopped = "mating found no genome that was not evaluated already"
                break
            n = min(m, budget - len(res.points), len(keep))
            chosen = keep[:n]
            if model is not None and len(keep) > n:
                X = np.array([p.genome for p in res.points], dtype=float)
                y = np.array([p.score for p in res.points])
                model.fit(X, y)
                cand = np.array([rows[i] for i in keep], dtype=float)
                pred = np.asarray(model.predict(cand), dtype=float).reshape(-1)
                F = np.c_[-pred, [storage(rows[i]) for i in keep]]
                cpop = Population.new("X", cand, index=np.array(keep))
                cpop.set("F", F)
                picked = RankAndCrowding().do(
                    problem, cpop, n_survive=n, random_state=np.random.default_rng([settings.seed, gen])
                )
                chosen = sorted(int(i) for i in picked.get("index"))
            gen += 1
            sub = off[chosen]
            pts = [real(rows[i], gen) for i in chosen]
            sub.set("F", np.array([[-p.score, p.storage] for p in pts]))
            algo.tell(infills=sub)
            _end_generation(res, gen, bar, on_generation)
        else:
            res.stopped = f"{budget} real evaluations spent"
    finally:
        bar.close()
    res.wall_s = time.perf_counter() - t0
    return res


def _end_generation(res: SearchResult, gen: int, bar, on_generation) -> None:
    res.fronts.append(non_dominated(res.points))
    front = [res.points[i] for i in res.fronts[-1]]
    res.history.append(
        {
            "generation": gen,
            "evaluations": len(res.points),
            "front_size": len(front),
            "best_score": max(p.score for p in front),
            "min_storage": min(p.storage for p in front),
        }
    )
    bar.set_postfix_str(
        f"evaluations={len(res.points)}, front={len(front)}, best={max(p.score for p in front):.4g}",
        refresh=False,
    )
    bar.update(1)
    if on_generation is not None:
        on_generation(gen, res)


# ---------------------------------------------------------------------------------------- fronts: files
FRONT_COLUMNS = ("generation", "evaluations", "point", "storage_ratio", "accuracy", "genome")


def front_rows(res: SearchResult, gen_index: int, genome_text: Callable[[Genome], str]) -> list[list]:
    """CSV rows of the front after generation `gen_index` (0-based)."""
    h = res.history[gen_index]
    return [
        [h["generation"], h["evaluations"], j, res.points[i].storage, res.points[i].score,
         genome_text(res.points[i].genome)]
        for j, i in enumerate(res.fronts[gen_index])
    ]  # fmt: skip


def front_figure(res: SearchResult, title: str = "", ylabel: str = "mean normalised validation accuracy"):
    """Accuracy against storage of the front after every generation, coloured by generation (the last one
    drawn as a line on top), and every real evaluation as a grey dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    ax.scatter(
        [p.storage for p in res.points], [p.score for p in res.points], s=10, c="#c8c8c8", label="evaluated"
    )
    n = len(res.fronts)
    cmap = plt.get_cmap("viridis")
    for g, front in enumerate(res.fronts):  # later generations on top; each front a staircase
        xs = [res.points[i].storage for i in front]
        ys = [res.points[i].score for i in front]
        last = g == n - 1
        ax.step(xs, ys, where="post", color=cmap(g / max(1, n - 1)), lw=2.0 if last else 1.0, zorder=2 + g)
        ax.scatter(xs, ys, color=cmap(g / max(1, n - 1)), s=36 if last else 14, zorder=2 + g,
                   label="front after the last generation" if last else None)  # fmt: skip
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, max(2, n)))
    cb = fig.colorbar(sm, ax=ax)
    cb.locator = MaxNLocator(integer=True)
    cb.update_ticks()
    cb.set_label("generation")
    ax.set_xlabel("storage ratio (× |θ0|)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def front_png(res: SearchResult, title: str = "") -> bytes:
    import matplotlib.pyplot as plt

    fig = front_figure(res, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
