"""What a user sees while a merge runs: one bar per stage named by the stage with the right totals, metrics
under their full names and equal to the summary's, no Lightning epoch bar, banner or `v_num`, and a word about
a work directory left by an interrupted run."""

from __future__ import annotations

import re

import pytest

import didi.refine as refine_mod
from didi import load_artifact
from didi.backbones import Adapter, Zoo
from didi.decompose import decompose
from didi.pipeline import MergeOptions, run_merge, work_dir_for
from didi.refine import RefineConfig
from didi.trainer import TrainerConfig

BANNER = ("GPU available", "TPU available", "HPU available", "LOCAL_RANK", "`Trainer.fit` stopped")


def _opts(fast, tmp_path, budget: float = 1.3, verbose: bool = False, resume: bool = False) -> MergeOptions:
    d, s, _, _ = fast
    trainer = TrainerConfig(
        accelerator="cpu", logger="csv", log_dir=str(tmp_path / "logs"), progress_bar=True, verbose=verbose
    )
    # layer batches of 3 matrices: the refinement bar advances by several matrices per step
    return MergeOptions(budget, d, s, RefineConfig(sweeps=2, layer_batch_size=3), trainer, resume=resume)


def _lines(captured) -> str:
    """Captured stdout + stderr, with the bars' carriage-return updates as separate lines."""
    return (captured.out + captured.err).replace("\r", "\n")


def _last(text: str, prefix: str) -> str:
    return [ln for ln in text.splitlines() if ln.startswith(prefix)][-1]


def _logged(caplog) -> str:
    """What Lightning's loggers printed (their stream handler holds the stderr of import time, which `capfd`
    does not see; the records reach `caplog` after the loggers' filters, as they reach that handler)."""
    return "\n".join(r.getMessage() for r in caplog.records)


def test_merge_shows_one_bar_per_stage_and_the_summary_numbers(tmp_path, tiny_zoo, fast, capfd, caplog):
    zoo = Zoo(Adapter(), *tiny_zoo)
    path = run_merge(zoo, tmp_path / "art", _opts(fast, tmp_path))
    text = _lines(capfd.readouterr()) + _logged(caplog)
    n_tensors, n_matrices = len(zoo.plan), len(decompose(zoo, fast[0], progress=False).matrices)
    steps = fast[1].steps
    assert f"decompose {n_tensors}/{n_tensors} tensors" in text
    assert f"search step {steps}/{steps}" in text
    assert f"refine {n_matrices}/{n_matrices} matrices" in text
    for absent in ("Epoch", "/-2", "v_num", "…", *BANNER):
        assert absent not in text, absent
    # the refinement bar ends on the numbers the summary prints (`didi merge`: 4 significant digits)
    ref = load_artifact(path).manifest["metrics"]["refine"]
    final = _last(text, "refine ")
    assert f"rec_err_before={ref['rec_err_before']:.4g}" in final
    assert f"rec_err_after={ref['rec_err_after']:.4g}" in final
    # the search bar says that its numbers are the soft error and ratio of continuous ranks
    assert re.search(r"soft_rec_err=[0-9.e-]+, soft_ratio=[0-9.]+", _last(text, "search step"))


def test_verbose_shows_lightning_banner_once(tmp_path, tiny_zoo, fast, capfd, caplog):
    run_merge(Zoo(Adapter(), *tiny_zoo), tmp_path / "art", _opts(fast, tmp_path, verbose=True))
    text = _lines(capfd.readouterr()) + _logged(caplog)
    assert text.count("GPU available") == 1
    assert text.count("TPU available") == 1
    assert text.count("`Trainer.fit` stopped: `max_steps=") == 1


def _interrupt_refinement(monkeypatch, after_batches: int) -> None:
    """Make the refinement fail after `after_batches` layer batches (a crash or a kill mid-stage)."""
    real = refine_mod.LoRARefine.training_step

    def step(self, batch, batch_idx):
        if batch_idx >= after_batches:
            raise RuntimeError("simulated crash")
        return real(self, batch, batch_idx)

    monkeypatch.setattr(refine_mod.LoRARefine, "training_step", step)


def test_rerun_is_told_about_the_work_directory(tmp_path, tiny_zoo, fast, capfd, monkeypatch):
    zoo = Zoo(Adapter(), *tiny_zoo)
    out = tmp_path / "art"
    work = work_dir_for(out)
    with monkeypatch.context() as m:
        _interrupt_refinement(m, after_batches=1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_merge(zoo, out, _opts(fast, tmp_path))
    assert work.is_dir()
    first = _lines(capfd.readouterr())
    assert str(work) not in first  # a fresh run has nothing to say about its own directory

    # without --resume: said once, with the path, how to resume and how to start afresh
    with monkeypatch.context() as m:
        _interrupt_refinement(m, after_batches=1)
        with pytest.raises(RuntimeError):
            run_merge(zoo, out, _opts(fast, tmp_path))
    err = capfd.readouterr().err
    assert err.count(str(work)) == 1, err
    assert "--resume true" in err and "delet" in err
    assert "3 refined matrices" in err  # what the interrupted run left

    # with --resume: says it resumes; the bar counts every matrix and ends on the summary's numbers
    path = run_merge(zoo, out, _opts(fast, tmp_path, resume=True))
    captured = capfd.readouterr()
    assert captured.err.count(f"didi: resuming from {work}") == 1
    text = _lines(captured)
    n = len(decompose(zoo, fast[0], progress=False).matrices)
    ref = load_artifact(path).manifest["metrics"]["refine"]
    steps = fast[1].steps
    assert f"search step {steps}/{steps}" in text  # shown even when the search had finished before
    final = _last(text, "refine ")
    assert final.startswith(f"refine {n}/{n} matrices"), final
    assert f"rec_err_before={ref['rec_err_before']:.4g}" in final
    assert f"rec_err_after={ref['rec_err_after']:.4g}" in final
    assert not work.exists()


def test_matrices_refined_at_other_ranks_are_redone(tmp_path, tiny_zoo, fast, capfd, monkeypatch):
    """A re-run with another budget finds matrices refined at the old ranks: they are redone, not reused (the
    artifact's factors have the new ranks)."""
    zoo = Zoo(Adapter(), *tiny_zoo)
    out = tmp_path / "art"
    with monkeypatch.context() as m:
        _interrupt_refinement(m, after_batches=2)
        with pytest.raises(RuntimeError):
            run_merge(zoo, out, _opts(fast, tmp_path, budget=1.3))
    path = run_merge(zoo, out, _opts(fast, tmp_path, budget=1.6))
    art = load_artifact(path)
    fresh = load_artifact(run_merge(zoo, tmp_path / "fresh", _opts(fast, tmp_path, budget=1.6)))
    assert art.manifest["ranks"] == fresh.manifest["ranks"]
    ref, ref_fresh = art.manifest["metrics"]["refine"], fresh.manifest["metrics"]["refine"]
    assert ref["rec_err_after"] == pytest.approx(ref_fresh["rec_err_after"], rel=1e-6)


def test_bars_redraw_rarely_when_stderr_is_a_log(capfd):
    """A bar whose output is a file or pipe (a batch job's log) is drawn at the start and the end only:
    20 updates over 0.6 s leave two lines (tqdm's own 0.1 s interval would draw about six), on a
    terminal that interval holds."""
    import io
    import time

    from didi.progress import LOG_INTERVAL, redraw_interval, stage_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert redraw_interval(io.StringIO()) == LOG_INTERVAL and redraw_interval(Terminal()) == 0.1
    bar = stage_bar("search step", 20)
    for _ in range(20):
        time.sleep(0.03)
        bar.update(1)
    bar.close()
    drawn = [ln for ln in _lines(capfd.readouterr()).splitlines() if ln.startswith("search step")]
    assert len(drawn) == 2 and drawn[0].startswith("search step 0/20") and "20/20" in drawn[-1]
