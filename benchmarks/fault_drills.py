"""Fault drills (issue 14, item 5): kill -9 in every stage of `didi merge`, a disk that fills, two merges
racing for one output and one factor-store cache, a corrupted factor-store file, a tampered artifact.

Every drill runs real `didi merge` subprocesses on a small synthetic zoo (4 tasks, width 64, 4 blocks: about
30 s a merge on 2 CPU cores) inside one temporary directory that is removed at the end, and checks what
matters after a fault: no data is lost or silently wrong. A rerun (`--resume true`) must give an artifact
equal to an uninterrupted merge's (bit-identical tensors, same ranks) and leave no temporary directory in
the output's parent or the cache. Stages are detected by watching files appear (the factor store's `.tmp-*`
directory, `.OUT.work/search/last.ckpt`, `.OUT.work/refine/*.safetensors`, the artifact's `.OUT.tmp-*`
directory), not by hooks inside didi. The disk-full drills mount small tmpfs volumes (root only; without
`mount` they fall back to RLIMIT_FSIZE, and the table says so).

    cd benchmarks && ../.venv/bin/python fault_drills.py          # every drill: about 8 min on 2 cores
    ../.venv/bin/python fault_drills.py --only corrupt_store tampered_artifact --keep
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from common import md_table, write_results
from safetensors.torch import load_file, save_file

from didi.artifact import load_artifact
from didi.decompose import FactorStore
from didi.errors import DidiError
from didi.sources import file_sha256
from didi.synthetic import make_zoo

ZOO = {"T": 4, "width": 64, "layers": 4, "noise": 0.01, "seed": 0}
N_MATRICES = 4 * ZOO["layers"]
SEARCH_STEPS = 400  # the search checkpoints every 50 steps: a kill after the first one has work to resume
MERGE_ARGS = [
    "--budget",
    "1.3",
    "--decompose.device",
    "cpu",
    "--trainer.accelerator",
    "cpu",
    "--trainer.logger",
    "none",
    "--trainer.progress_bar",
    "false",
    "--search.steps",
    str(SEARCH_STEPS),
    "--refine.layer_batch_size",
    "1",  # one matrix per refinement step: a kill can land between two finished matrices
]
# one thread per merge: two run at once in the concurrency drill, on a machine that others share
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}


@dataclass
class Row:
    """One drill's verdict: the table's columns, whether every check held, and what was seen."""

    fault: str
    stage: str
    outcome: str
    data_lost: str
    passed: bool
    details: dict = field(default_factory=dict)


def last_error(log: str) -> str:
    """The line a user reads first after a failure: didi's own error line, else the traceback's last."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("didi: error"):
            return ln
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else ""


def artifact_diff(a: Path, b: Path) -> list[str]:
    """Differences between two artifacts' tensors (bit for bit) and ranks; [] when equal."""
    if not (a / "manifest.json").exists():
        return [f"{a.name}: no artifact"]
    out = []
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    if ma.get("ranks") != mb.get("ranks"):
        out.append("ranks differ")
    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*.safetensors"))
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*.safetensors"))
    if fa != fb:
        return out + [f"tensor files differ: {fa} vs {fb}"]
    for rel in fa:
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        if ta.keys() != tb.keys():
            out.append(f"{rel}: keys differ")
            continue
        bad = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        if bad:
            out.append(f"{rel}: {len(bad)} tensors differ ({bad[0]}, ...)")
    return out


def rank_mismatches(art: Path) -> list[str]:
    """Tensors whose stored LoRA factors do not have the ranks the manifest lists (a shared factor, or one
    task's): such an artifact loads without error and is wrong."""
    m = json.loads((art / "manifest.json").read_text())
    shared = load_file(str(art / "shared.safetensors"))
    tasks = {t: load_file(str(art / "tasks" / f"{t}.safetensors")) for t in m["tasks"]}
    out = []
    for name, ranks in m.get("ranks", {}).items():
        for who, terms in [("shared", shared), *tasks.items()]:
            a = terms.get(f"{name}::lora_A")
            width = 0 if a is None else a.shape[1]
            if width != ranks.get(who, 0):
                out.append(f"{name} {who}: rank {width}, manifest {ranks.get(who, 0)}")
    return out


def strays(*dirs: Path) -> list[str]:
    """Temporary directories (`*.tmp-*`) and run scratch directories (`.*.work`) left in `dirs`."""
    return sorted(
        f"{d.name}/{p.name}"
        for d in dirs
        if d.exists()
        for p in d.iterdir()
        if ".tmp-" in p.name or p.name.endswith(".work")
    )


def mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of `size` at `path` (root only); False when mounting is not permitted here."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def fsize_limit(nbytes: int) -> Callable[[], None]:
    """preexec_fn for the fallback without tmpfs: no file may grow past `nbytes` (writes fail with EFBIG
    instead of the process dying of SIGXFSZ)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


class Drills:
    """The zoo, the reference artifact and the drills; everything lives under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        base, tasks = make_zoo(root / "zoo", **ZOO)
        self.base, self.tasks = str(base), {k: str(v) for k, v in tasks.items()}
        (root / "logs").mkdir()
        self.ref = root / "reference" / "out"
        self.ref_cache = root / "reference" / "cache"
        self.procs: list[subprocess.Popen] = []

    def cleanup(self) -> None:
        """Kill (by pid) any merge a failed drill left running or stopped."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # ------------------------------------------------------------------------------------------ running
    def argv(self, out: Path, cache: Path, *extra: str) -> list[str]:
        tasks = "{" + ", ".join(f"{k}: {v}" for k, v in self.tasks.items()) + "}"
        return [
            sys.executable,
            *("-m", "didi", "merge", self.base, tasks, str(out)),
            *("--decompose.cache_dir", str(cache), *MERGE_ARGS, *extra),
        ]

    def start(self, name: str, out: Path, cache: Path, *extra: str, preexec=None) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "w")
        p = subprocess.Popen(
            self.argv(out, cache, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=self.root,
            preexec_fn=preexec,
        )
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def merge(self, name: str, out: Path, cache: Path, *extra: str, preexec=None) -> tuple[int, str]:
        p = self.start(name, out, cache, *extra, preexec=preexec)
        return p.wait(), self.log(name)

    def seeded_cache(self, d: Path) -> Path:
        """A private copy of the reference's factor store (drills after decompose need not redo it)."""
        shutil.copytree(self.ref_cache, d / "cache")
        return d / "cache"

    @staticmethod
    def act_when(p: subprocess.Popen, trigger: Callable[[], str | None], sig: int, timeout: float = 600):
        """Send `sig` to `p` as soon as `trigger()` describes the awaited state; None if `p` ended first."""
        t0 = time.monotonic()
        while p.poll() is None:
            seen = trigger()
            if seen:
                os.kill(p.pid, sig)
                return seen
            if time.monotonic() - t0 > timeout:
                p.kill()
                raise TimeoutError("drill: the awaited state never came")
            time.sleep(0.001)
        return None

    # ------------------------------------------------------------------------------------------- drills
    def reference(self) -> Row:
        t0 = time.time()
        rc, log = self.merge("reference", self.ref, self.ref_cache)
        if rc != 0:
            raise RuntimeError(f"the uninterrupted reference merge failed:\n{log[-3000:]}")
        self.merge_seconds = time.time() - t0
        m = json.loads((self.ref / "manifest.json").read_text())
        return Row(
            "none (reference)",
            "whole merge",
            f"uninterrupted merge in {self.merge_seconds:.0f} s, storage ratio {m['storage']['ratio']:.6g}",
            "none",
            True,
            {"seconds": self.merge_seconds},
        )

    def kill(self, stage: str) -> Row:
        d = self.root / f"kill_{stage}"
        d.mkdir()
        out = d / "out"
        work = d / f".{out.name}.work"
        cache = d / "cache" if stage == "decompose" else self.seeded_cache(d)
        triggers: dict[str, Callable[[], str | None]] = {
            "decompose": lambda: (
                f"{n} of {N_MATRICES} matrix files in the store's .tmp-* dir"
                if (n := len(list(cache.glob("*.tmp-*/matrices/*.safetensors"))))
                else None
            ),
            "search": lambda: (
                "search/last.ckpt written" if (work / "search" / "last.ckpt").exists() else None
            ),
            "refine": lambda: (
                f"{n} of {N_MATRICES} refined matrices in .out.work/refine/"
                if (n := len(list((work / "refine").glob("*.safetensors"))))
                else None
            ),
            "artifact": lambda: (
                f"artifact's temporary dir {ts[0].name} exists ({len(list(ts[0].rglob('*')))} entries)"
                if (ts := list(d.glob(f".{out.name}.tmp-*")))
                else None
            ),
        }
        p = self.start(f"kill_{stage}", out, cache)
        seen = self.act_when(p, triggers[stage], signal.SIGKILL)
        p.wait()
        details: dict = {"at_kill": seen, "rc_killed": p.returncode}
        if seen is None or p.returncode != -signal.SIGKILL:
            return Row(
                "kill -9", stage, f"the window was missed (merge ended, rc {p.returncode})", "?", False
            )
        if stage == "search":
            ck = torch.load(work / "search" / "last.ckpt", map_location="cpu", weights_only=False)
            details["at_kill"] += f" (step {ck['global_step']} of {SEARCH_STEPS})"
        details["left_after_kill"] = strays(d, cache)
        if stage == "refine":
            details["refined_at_kill"] = sorted(p.name for p in (work / "refine").glob("*.safetensors"))
        rc, log = self.merge(f"kill_{stage}_rerun", out, cache, "--resume", "true")
        details["rerun_rc"] = rc
        diff = artifact_diff(out, self.ref) if rc == 0 else [f"rerun failed: {last_error(log)}"]
        left = strays(d, cache)
        details.update(diff=diff, left_after_rerun=left)
        ok = rc == 0 and not diff and not left
        outcome = (
            f"killed when {details['at_kill']}; left {', '.join(details['left_after_kill']) or 'nothing'}; "
            f"rerun --resume true: "
            + ("artifact identical to the uninterrupted merge's" if not diff else "; ".join(diff))
            + (f"; stray after rerun: {', '.join(left)}" if left else "; no stray temporary dirs")
        )
        return Row(
            "kill -9",
            stage,
            outcome,
            "none" if rc == 0 and not diff else "yes: " + "; ".join(diff),
            ok,
            details,
        )

    def truncated_refine_file(self) -> Row:
        """A kill that lands while a refinement file is being written (simulated: the last finished file cut
        to half its size, as a kill mid-`save_file` leaves it). The rerun must not trust it."""
        d = self.root / "torn_refine"
        d.mkdir()
        out, cache = d / "out", self.seeded_cache(d)
        work = d / f".{out.name}.work"
        p = self.start("torn_refine", out, cache)
        seen = self.act_when(
            p,
            lambda: "refined" if len(list((work / "refine").glob("*.safetensors"))) >= 2 else None,
            signal.SIGKILL,
        )
        p.wait()
        if seen is None:
            return Row("kill -9 mid-write of a refinement file", "refine", "window missed", "?", False)
        f = sorted((work / "refine").glob("*.safetensors"))[-1]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        rc, log = self.merge("torn_refine_rerun", out, cache, "--resume", "true")
        diff = artifact_diff(out, self.ref) if rc == 0 else [f"rerun failed: {last_error(log)}"]
        left = strays(d, cache)
        ok = rc == 0 and not diff and not left
        outcome = (
            f"{f.name} cut to half after the kill; rerun --resume true: "
            + ("artifact identical to the uninterrupted merge's" if not diff else "; ".join(diff))
            + (f"; stray after rerun: {', '.join(left)}" if left else "")
        )
        lost = (
            "none"
            if ok
            else ("none, but the run cannot resume until .out.work is deleted" if rc else "; ".join(diff))
        )
        return Row(
            "kill -9 mid-write of a refinement file (simulated)",
            "refine",
            outcome,
            lost,
            ok,
            {"file": f.name},
        )

    def disk_full_store(self) -> Row:
        d = self.root / "disk_full_store"
        vol, out = d / "vol", d / "out"
        cache = vol / "cache"
        mounted = mount_tmpfs(vol, "2m")  # the store needs about 5.4 MB
        method = (
            "tmpfs of 2 MiB as decompose.cache_dir"
            if mounted
            else "RLIMIT_FSIZE 200 KB (mount not permitted)"
        )
        try:
            pre = None if mounted else fsize_limit(200_000)
            rc, log = self.merge("disk_full_store", out, cache, preexec=pre)
            err = last_error(log)
            index = [str(p.relative_to(vol)) for p in cache.rglob("index.json")] if cache.exists() else []
            left = strays(cache)
            art = out.exists()
            half = rc != 0 and not index and not left and not art
            if mounted:
                umount(vol)
                mounted = mount_tmpfs(vol, "64m")
            rc2, log2 = self.merge("disk_full_store_rerun", out, cache, "--resume", "true")
            diff = artifact_diff(out, self.ref) if rc2 == 0 else [f"rerun failed: {last_error(log2)}"]
        finally:
            if mounted:
                umount(vol)
        ok = half and rc2 == 0 and not diff
        outcome = (
            f"{method}: merge failed (rc {rc}) with '{err}'; index.json in the cache: {index or 'none'}; "
            f"temporary dirs left: {left or 'none'}; artifact dir: {'present' if art else 'none'}; "
            f"rerun with space: "
            + ("artifact identical to the uninterrupted merge's" if not diff else "; ".join(diff))
        )
        return Row(
            "disk full",
            "decompose (factor store)",
            outcome,
            "none" if ok else "see outcome",
            ok,
            {"method": method, "rc": rc, "error": err, "rerun_rc": rc2, "diff": diff},
        )

    def disk_full_artifact(self) -> Row:
        d = self.root / "disk_full_artifact"
        vol = d / "vol"
        out = vol / "out"
        work = vol / f".{out.name}.work"
        cache = self.seeded_cache(d)
        mounted = mount_tmpfs(vol, "64m")
        filler = vol / "filler"
        keep = 96 * 1024  # the artifact needs about 340 KB
        if mounted:
            method = f"tmpfs as the output's parent, filled to {keep // 1024} KiB free when refinement ended"
        else:
            method = "RLIMIT_FSIZE 60 KB set on the merge when refinement ended (mount not permitted)"
        try:
            p = self.start("disk_full_artifact", out, cache)

            def refined() -> str | None:
                if list(vol.glob(f".{out.name}.tmp-*")):
                    return "artifact writing began"
                n = len(list((work / "refine").glob("*.safetensors")))
                return "refinement finished" if n == N_MATRICES else None

            seen = self.act_when(p, refined, signal.SIGSTOP)
            if seen is None:
                return Row("disk full", "artifact", "window missed", "?", False)
            if mounted:
                st = os.statvfs(vol)
                with open(filler, "wb") as f:
                    left = st.f_bavail * st.f_frsize - keep
                    while left > 0:
                        left -= f.write(b"\0" * min(left, 1 << 20))
            else:  # CPython ignores SIGXFSZ: a write past the limit fails with EFBIG
                resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (60_000, 60_000))
            os.kill(p.pid, signal.SIGCONT)
            rc = p.wait()
            err = last_error(self.log("disk_full_artifact"))
            tmp = [s for s in strays(vol) if ".tmp-" in s]
            half = out.exists()
            clean = rc != 0 and not half and not tmp
            filler.unlink(missing_ok=True)
            rc2, log2 = self.merge("disk_full_artifact_rerun", out, cache, "--resume", "true")
            diff = artifact_diff(out, self.ref) if rc2 == 0 else [f"rerun failed: {last_error(log2)}"]
            left = strays(vol, cache)
        finally:
            if mounted:
                umount(vol)
        ok = clean and rc2 == 0 and not diff and not left
        outcome = (
            f"{method} ({seen}): merge failed (rc {rc}) with '{err}'; artifact dir: "
            f"{'present' if half else 'none'}; temporary dirs left: {', '.join(tmp) or 'none'}; rerun "
            "--resume true with space: "
            + ("artifact identical to the uninterrupted merge's" if not diff else "; ".join(diff))
            + (f"; stray after rerun: {', '.join(left)}" if left else "")
        )
        return Row(
            "disk full",
            "artifact",
            outcome,
            "none" if ok else "see outcome",
            ok,
            {"method": method, "rc": rc, "error": err, "rerun_rc": rc2, "diff": diff},
        )

    def concurrent(self) -> Row:
        d = self.root / "concurrent"
        d.mkdir()
        out, cache = d / "out", d / "cache"
        ps = [self.start(f"concurrent_{i}", out, cache) for i in (1, 2)]
        rcs = [p.wait() for p in ps]
        errs = [last_error(self.log(f"concurrent_{i}")) for i, rc in zip((1, 2), rcs) if rc]
        diff = artifact_diff(out, self.ref)
        stores = [p for p in cache.iterdir() if ".tmp-" not in p.name] if cache.exists() else []
        left = strays(d, cache)
        store_ok = ""
        try:
            FactorStore(stores[0])
            store_ok = "loads"
        except (DidiError, IndexError, OSError) as e:
            store_ok = f"does not load: {e}"
        index = stores[0] / "index.json" if stores else None
        before = index.stat().st_mtime_ns if index else None
        rc3, log3 = self.merge("concurrent_third", d / "out3", cache)
        reused = rc3 == 0 and index.stat().st_mtime_ns == before and not strays(cache)
        diff3 = (
            artifact_diff(d / "out3", self.ref) if rc3 == 0 else [f"third merge failed: {last_error(log3)}"]
        )
        one_wins = sorted(rcs)[0] == 0 and (sorted(rcs)[1] != 0 or not diff)
        clean_loser = all(e.startswith("didi: error") for e in errs)
        ok = one_wins and clean_loser and not diff and len(stores) == 1 and store_ok == "loads" and not left
        ok = ok and reused and not diff3
        outcome = (
            f"exit codes {rcs}; loser: {'; '.join(errs) or 'none'}; winner's artifact "
            + ("identical to the uninterrupted merge's" if not diff else "; ".join(diff))
            + f"; cache: {len(stores)} store, {store_ok}; strays: {left or 'none'}; third merge "
            + (
                "reused the store (index.json untouched, no decompose) and gave the same artifact"
                if reused and not diff3
                else f"rc {rc3}: {'; '.join(diff3)}, reused={reused}"
            )
        )
        lost = "none" if not diff and not diff3 else "yes"
        return Row(
            "two concurrent merges, same output and cache (started together)",
            "whole merge",
            outcome,
            lost,
            ok,
            {"rcs": rcs, "errors": errs, "strays": left, "third_rc": rc3, "reused": reused},
        )

    def concurrent_interleaved(self) -> Row:
        """The same race with the interleaving that the scheduler only sometimes picks, forced with SIGSTOP:
        merge B (budget 1.6) is paused once it has refined a matrix; merge A (budget 1.3, same output, same
        scratch directory .out.work) runs until it begins writing its artifact and is paused; B resumes and
        finishes; then A resumes."""
        d = self.root / "concurrent_interleaved"
        d.mkdir()
        out, cache = d / "out", self.seeded_cache(d)
        work = d / f".{out.name}.work"
        b = self.start("interleaved_b", out, cache, "--budget", "1.6")
        seen_b = self.act_when(
            b,
            lambda: "B refined a matrix" if list((work / "refine").glob("*.safetensors")) else None,
            signal.SIGSTOP,
        )
        a = self.start("interleaved_a", out, cache)
        seen_a = self.act_when(
            a, lambda: "A writes its artifact" if list(d.glob(f".{out.name}.tmp-*")) else None, signal.SIGSTOP
        )
        if seen_b is not None and seen_a is None and a.returncode is not None:
            # A ended before writing anything: with the run lock, it is refused at once while B holds the
            # output's work directory; B then finishes alone
            os.kill(b.pid, signal.SIGCONT)
            rc_b = b.wait()
            err_a = last_error(self.log("interleaved_a"))
            bad = rank_mismatches(out) if out.exists() else ["no artifact"]
            left = strays(d, cache)
            ok = a.returncode == 2 and "another didi run" in err_a and rc_b == 0 and not bad and not left
            return Row(
                "two concurrent merges, same output, other budgets (interleaving forced)",
                "refine + artifact",
                f"B paused after refining a matrix; A started on the same output: exit code {a.returncode} "
                f"({err_a}); B resumed: exit code {rc_b}, "
                + (
                    f"{len(bad)} tensors' factors off the manifest's ranks"
                    if bad
                    else "its factors have the manifest's ranks"
                )
                + f"; strays: {', '.join(left) or 'none'}",
                "none" if not bad else f"yes: {len(bad)} tensors",
                ok,
                {
                    "rc_a": a.returncode,
                    "rc_b": rc_b,
                    "errors": {"a": err_a},
                    "mismatches": bad,
                    "strays": left,
                },
            )
        if seen_b is None or seen_a is None:
            for p in (a, b):
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)
                    p.wait()
            return Row("two concurrent merges, interleaved", "refine + artifact", "window missed", "?", False)
        os.kill(b.pid, signal.SIGCONT)
        rc_b = b.wait()
        os.kill(a.pid, signal.SIGCONT)
        rc_a = a.wait()
        errs = {n: last_error(self.log(f"interleaved_{n}")) for n, rc in (("a", rc_a), ("b", rc_b)) if rc}
        bad = rank_mismatches(out) if out.exists() else ["no artifact"]
        winner = "A" if rc_a == 0 else "B" if rc_b == 0 else "none"
        diff = artifact_diff(out, self.ref) if winner == "A" else []
        left = strays(d, cache)
        clean = all(e.startswith("didi: error") for e in errs.values())
        ok = winner != "none" and not bad and not diff and clean and not left
        outcome = (
            f"exit codes A {rc_a}, B {rc_b}; winner {winner}; "
            + (
                f"its artifact is inconsistent: {len(bad)} tensors' factors do not have the manifest's ranks "
                f"({bad[0]}, ...)"
                if bad
                else "its artifact's factors have the manifest's ranks"
            )
            + (f", differs from the reference: {'; '.join(diff)}" if diff else "")
            + f"; loser: {'; '.join(f'{k.upper()}: {v}' for k, v in errs.items()) or 'none'}"
            + f"; strays: {', '.join(left) or 'none'}"
        )
        lost = (
            "none"
            if not bad and not diff
            else f"yes: the winner's artifact is silently wrong ({len(bad)} tensors)"
        )
        return Row(
            "two concurrent merges, same output, other budgets (interleaving forced)",
            "refine + artifact",
            outcome,
            lost,
            ok,
            {"rc_a": rc_a, "rc_b": rc_b, "errors": errs, "mismatches": bad, "strays": left},
        )

    def corrupt_store(self) -> Row:
        d = self.root / "corrupt_store"
        d.mkdir()
        out, cache = d / "out", self.seeded_cache(d)
        store = next(p for p in cache.iterdir() if ".tmp-" not in p.name)
        f = store / "matrices" / "00000.safetensors"
        good = file_sha256(f)
        raw = bytearray(f.read_bytes())
        # the middle of the tensor data, past the header: the file still loads, with wrong numbers
        at = (8 + int.from_bytes(raw[:8], "little") + len(raw)) // 2
        for i in range(at, at + 4):
            raw[i] ^= 0xFF
        f.write_bytes(bytes(raw))
        rc, log = self.merge("corrupt_store", out, cache)
        warned = [ln.strip() for ln in log.splitlines() if "sha256" in ln or "checksum" in ln]
        restored = f.exists() and file_sha256(f) == good
        diff = artifact_diff(out, self.ref) if rc == 0 else [f"merge failed: {last_error(log)}"]
        left = strays(d, cache)
        ok = rc == 0 and bool(warned) and restored and not diff and not left
        outcome = (
            f"4 bytes flipped mid-data in matrices/00000.safetensors (it still loads); merge rc {rc}; "
            + (f"detected: '{warned[0].split('UserWarning: ')[-1]}'" if warned else "not detected")
            + ("; file recomputed (sha256 as before the fault)" if restored else "; file not recomputed")
            + "; artifact "
            + ("identical to the uninterrupted merge's" if not diff else "; ".join(diff))
        )
        lost = "none" if not diff else "yes: the artifact is silently wrong (" + "; ".join(diff) + ")"
        return Row(
            "factor-store file corrupted on disk",
            "decompose (cache reuse)",
            outcome,
            lost,
            ok,
            {"warning": warned, "restored": restored, "diff": diff},
        )

    def tampered_artifact(self) -> Row:
        d = self.root / "tampered"
        art = d / "art"
        shutil.copytree(self.ref, art)
        rel = "tasks/task_0.safetensors"
        t = load_file(str(art / rel))
        key = sorted(t)[0]
        t[key].view(-1)[0] += 1.0
        save_file(t, str(art / rel))
        try:
            load_artifact(art, verify=True)
            refused = "loaded"
        except DidiError as e:
            refused = str(e)
        by_load = rel in refused
        cli = subprocess.run(
            [sys.executable, "-m", "didi", "inspect", str(art), "--verify", "true"],
            capture_output=True,
            text=True,
            env=ENV,
        )
        cli_ok = subprocess.run(
            [sys.executable, "-m", "didi", "inspect", str(self.ref), "--verify", "true"],
            capture_output=True,
            text=True,
            env=ENV,
        )
        by_cli = cli.returncode != 0 and rel in cli.stderr
        named = next((ln.strip() for ln in cli.stderr.splitlines() if rel in ln), last_error(cli.stderr))
        short = lambda msg: msg.replace(str(art), "ART")
        ok = by_load and by_cli and cli_ok.returncode == 0
        outcome = (
            f"one element of {key} in {rel} changed; load_artifact(verify=True): "
            + (f"refused ('{short(refused)}')" if by_load else f"not refused ({short(refused)})")
            + f"; didi inspect ART --verify true: rc {cli.returncode} ('{short(named)}'), "
            f"rc {cli_ok.returncode} on the untouched artifact"
        )
        return Row(
            "one tensor of an artifact tampered with",
            "artifact use",
            outcome,
            "none" if ok else "accepted",
            ok,
            {
                "load": refused,
                "cli_rc": cli.returncode,
                "cli_stderr": cli.stderr[-500:],
                "clean_rc": cli_ok.returncode,
            },
        )


DRILLS = {
    "kill_decompose": lambda d: d.kill("decompose"),
    "kill_search": lambda d: d.kill("search"),
    "kill_refine": lambda d: d.kill("refine"),
    "kill_artifact": lambda d: d.kill("artifact"),
    "torn_refine": lambda d: d.truncated_refine_file(),
    "disk_full_store": lambda d: d.disk_full_store(),
    "disk_full_artifact": lambda d: d.disk_full_artifact(),
    "concurrent": lambda d: d.concurrent(),
    "concurrent_interleaved": lambda d: d.concurrent_interleaved(),
    "corrupt_store": lambda d: d.corrupt_store(),
    "tampered_artifact": lambda d: d.tampered_artifact(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(DRILLS), help="run these drills (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (debugging)")
    ap.add_argument("--no_write", action="store_true", help="print the table, do not write results/")
    args = ap.parse_args()
    names = args.only or list(DRILLS)
    root = Path(tempfile.mkdtemp(prefix="didi_fault_drills_"))
    rows: list[Row] = []
    t0 = time.time()
    drills = None
    try:
        drills = Drills(root)
        rows.append(drills.reference())
        for name in names:
            print(f"drill {name} ...", flush=True)
            try:
                row = DRILLS[name](drills)
            except Exception as e:  # a broken drill is a row of the table, not the end of the run
                row = Row(name, "?", f"the drill itself failed: {type(e).__name__}: {e}", "?", False)
            finally:
                drills.cleanup()
            print(f"  {'PASS' if row.passed else 'FAIL'}: {row.outcome}", flush=True)
            rows.append(row)
    finally:
        if drills is not None:
            drills.cleanup()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for r in rows:  # the temporary directory's name says nothing
        r.outcome = r.outcome.replace(str(root), "$TMP")
        r.details = json.loads(json.dumps(r.details, default=str).replace(str(root), "$TMP"))
    table = md_table(
        ["fault", "stage", "outcome", "data lost", "pass"],
        [
            [r.fault, r.stage, r.outcome.replace("|", "/"), r.data_lost, "yes" if r.passed else "NO"]
            for r in rows
        ],
    )
    payload = {
        "command": "cd benchmarks && ../.venv/bin/python fault_drills.py"
        + (f" --only {' '.join(names)}" if args.only else ""),
        "zoo": ZOO,
        "merge_args": MERGE_ARGS,
        "seconds": time.time() - t0,
        "drills": [asdict(r) for r in rows],
        "all_passed": all(r.passed for r in rows),
    }
    if args.no_write:
        print(table)
    else:
        write_results("fault_drills", payload, table)
    sys.exit(0 if payload["all_passed"] else 1)


if __name__ == "__main__":
    main()
