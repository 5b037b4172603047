"""What a new user waits for: wall time and peak memory of `didi demo --kind synthetic` as a whole process
(imports included), each run in a fresh working directory under a temporary directory removed afterwards.

    python benchmarks/first_run.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import md_table, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    didi = str(Path(sys.executable).with_name("didi"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    walls = []
    root = Path(tempfile.mkdtemp(prefix="didi_first_run_"))
    try:
        for i in range(args.repeats):
            t = time.perf_counter()
            subprocess.run(
                [didi, "demo", "--kind", "synthetic", "--output", str(root / f"run{i}")],
                env=env,
                check=True,
                capture_output=True,
            )
            walls.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows = [
        [
            "didi demo --kind synthetic",
            f"{statistics.median(walls):.1f}",
            f"{min(walls):.1f}",
            f"{max(walls):.1f}",
            f"{peak_mb:.0f}",
        ]
    ]
    table = md_table(["command", "median wall s", "min s", "max s", "peak RSS MB"], rows)
    write_results(
        "first_run",
        {
            "command": "python benchmarks/first_run.py " + " ".join(sys.argv[1:]),
            "wall_s": walls,
            "peak_rss_mb": peak_mb,
        },
        table,
    )


if __name__ == "__main__":
    main()
