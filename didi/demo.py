"""`didi demo --kind synthetic`: a zoo with planted low-rank task vectors, merged and checked in about a minute."""
from __future__ import annotations

import time
from pathlib import Path

from didi.backbones import Adapter, Zoo
from didi.decompose import DecomposeConfig
from didi.pipeline import TrainerConfig, run_merge
from didi.refine import RefineConfig
from didi.search import SearchConfig
from didi.synthetic import make_zoo


def run_synthetic_demo(output: str, budget, tasks: int = 4, width: int = 64, layers: int = 4, seed: int = 0) -> Path:
    out = Path(output)
    zoo_dir, art = out / "zoo", out / f"merged_{budget}"
    if art.exists():
        import shutil

        shutil.rmtree(art)
    t0 = time.time()
    base, task_paths = make_zoo(zoo_dir, T=tasks, width=width, layers=layers, noise=0.02, seed=seed)
    zoo = Zoo(Adapter(), str(base), {k: str(v) for k, v in task_paths.items()})
    path = run_merge(zoo, art, budget, DecomposeConfig(cache_dir=str(out / "cache")), SearchConfig(),
                     RefineConfig(), TrainerConfig(log_dir=str(out / "logs")))
    print(f"\nsynthetic zoo: {tasks} tasks, {layers} blocks of width {width}, |θ0| = {zoo.base_params:,}; "
          f"demo took {time.time() - t0:.1f} s")
    return path
