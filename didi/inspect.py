"""`didi inspect`: what an artifact stores, what it costs, and the ranks it gives every module."""

from __future__ import annotations

from didi import jsonio
from didi.artifact import load_artifact
from didi.methods.published import artifact_ratio_row

#: breakdown entries that belong with the base, listed before the shared module and the tasks
BASE_PARTS = ("base", "fold")
#: the manifest's byte accounting (docs/method.md §4, §9), shown when the artifact has it
BYTE_KEYS = (
    "priced_in",
    "expert_dtype",
    "base_bytes",
    "stored_bytes",
    "ratio_elements",
    "ratio_bytes",
    "by_module_bytes",
    "by_kind_bytes",
)


def inspect_data(path: str) -> dict:
    """JSON view: storage_ratio, base_params, tasks, ranks {tensor: {"shared": int, task: int}}, breakdown."""
    a = load_artifact(path)
    m = a.manifest
    st = m["storage"]
    return {
        "path": str(a.path),
        "method": m["method"]["name"],
        "storage_ratio": float(st["ratio"]),
        "target_ratio": st.get("target_ratio"),
        "base_params": int(m["base_params"]),
        "tasks": a.tasks,
        "ranks": m.get("ranks", {}),
        "storage": {
            "stored_elements": st["stored_elements"],
            "by_module": st["by_module"],
            "by_kind": st["by_kind"],
            **{k: st[k] for k in BYTE_KEYS if k in st},
        },
        "metrics": m.get("metrics", {}),
        "adapter": m["adapter"],
        "published": artifact_ratio_row(m),
    }


def breakdown_order(modules: list[str], tasks: list[str]) -> list[str]:
    """The storage breakdown in reading order: base parts (`fold`), `shared`, the tasks in the artifact's own
    order, then anything else (FlexMerge's `group:*`, ...) alphabetically. An alphabetical sort put `fold` and
    `shared` between task names."""
    first = [m for m in (*BASE_PARTS, "shared", *tasks) if m in modules]
    return first + sorted(m for m in modules if m not in first)


def inspect_artifact(path: str, as_json: bool = False) -> str:
    """The human-readable view of `inspect_data` (or its JSON with `as_json`)."""
    d = inspect_data(path)
    if as_json:
        return jsonio.dumps(d, indent=1)
    lines = [
        f"artifact {d['path']}  method={d['method']}  adapter={d['adapter']['name']}",
        f"tasks ({len(d['tasks'])}): {', '.join(d['tasks'])}",
        f"storage ratio {d['storage_ratio']:.6g}"
        + (f" (target {d['target_ratio']:g})" if d["target_ratio"] else "")
        + (
            f" in bytes, of θ0's {d['storage']['base_bytes']:,} bytes"
            if d["storage"].get("priced_in") == "bytes"
            else f" of |θ0| = {d['base_params']:,}"
        ),
    ]
    pub = d["published"]
    if pub.get("published") is not None:
        lines.append(
            f"published ratio ({pub['paper'] or pub['method']}): {pub['published']:g}; ours "
            f"{d['storage_ratio']:.4g} — {pub['reason']}"
        )
    elif pub.get("reason"):
        lines.append(f"published ratio: none — {pub['reason']}")
    st = d["storage"]
    if "ratio_bytes" in st:
        lines.append(
            f"in elements: ratio {st['ratio_elements']:.6g}; in bytes: ratio {st['ratio_bytes']:.6g} of θ0's "
            f"{st['base_bytes']:,} bytes (the budget counted {st.get('priced_in', 'elements')}"
            + (f"; experts stored as {st['expert_dtype']}" if st.get("expert_dtype") else "")
            + ")"
        )
    lines += ["", "storage breakdown (elements):"]
    by_module = st["by_module"]
    for k in breakdown_order(list(by_module), d["tasks"]):
        v = by_module[k]
        lines.append(f"  {k:<24} {v:>14,.0f}  ({v / d['base_params']:.4%} of θ0)")
    if "by_module_bytes" in st:
        lines += ["", "storage breakdown (bytes):"]
        for k in breakdown_order(list(st["by_module_bytes"]), d["tasks"]):
            b = st["by_module_bytes"][k]
            lines.append(f"  {k:<24} {b:>14,.0f}  ({b / st['base_bytes']:.4%} of θ0's bytes)")
    if d["ranks"]:
        tasks = d["tasks"]
        head = ["tensor", "shared", *tasks]
        rows = [
            [name, str(r.get("shared", 0)), *(str(r.get(t, 0)) for t in tasks)]
            for name, r in d["ranks"].items()
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines += ["", "ranks:", "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
