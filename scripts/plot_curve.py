"""The size-versus-fidelity curve of scripts/real_model.py's held-out run as an SVG image (no plotting library):
the share of answer positions whose top token is the prompted model's, and KL(prompted || method), against entries
per layer and key/value head, for `compressed` and `evict`, each averaged over the held-out tasks of 30 to 300
tokens; `prefix` (R = P) is exact.

    python scripts/real_model.py plot        # reads scripts/results/real_model_heldout.json

And the trained summaries' trade-off (real_model.py's refine stage): KL(prompted || method) against patch bytes as a
share of the prefix's, short held-out tasks (mean) and long lists (mean), each method a colour.

    python scripts/real_model.py plot-refine # reads scripts/results/real_model_refine.json
"""

from __future__ import annotations

import math
from pathlib import Path

COLOURS = {"compressed": "#1f77b4", "evict": "#d62728"}
W, H, PAD = 340, 240, 48  # one panel


def curve(rows: list[dict], method: str, key: str, budgets: str = "numbers") -> list[tuple]:
    """[(R, mean of `key` over the short held-out tasks)] for method-R rows (budgets="P/3": the method-P/3 rows)."""
    by_budget: dict = {}
    for r in rows:
        name = r["method"]
        budget = name.split("-", 1)[1] if name.startswith(f"{method}-") else ""
        if not r["task"].startswith("long_") and (budget.isdigit() if budgets == "numbers" else budget == budgets):
            by_budget.setdefault(int(budget) if budget.isdigit() else budget, []).append(r[key])
    return sorted((b, sum(v) / len(v)) for b, v in by_budget.items())


def curve_table(rows: list[dict]) -> list[list]:
    """[[R, compressed top-1, evict top-1, compressed KL, evict KL]]: the curve's points, and R = P/3."""
    points = {(m, key): dict(curve(rows, m, key) + curve(rows, m, key, "P/3")) for m in COLOURS
              for key in ("top1_agreement", "kl")}
    budgets = list(points["compressed", "kl"])
    return [[b, *(f"{points[m, key].get(b, float('nan')):.{3 if key == 'kl' else 2}g}" for key in ("top1_agreement", "kl")
                  for m in COLOURS)] for b in budgets]


def panel(x0: int, title: str, series: dict[str, list[tuple[int, float]]], log_y: bool, y_range: tuple[float, float],
          y_label: str) -> list[str]:
    budgets = sorted({b for pts in series.values() for b, _ in pts})
    lo, hi = (math.log10(y_range[0]), math.log10(y_range[1])) if log_y else y_range
    fx = lambda b: x0 + PAD + (math.log2(b) - math.log2(budgets[0])) / (math.log2(budgets[-1]) - math.log2(budgets[0])) * (W - PAD - 16)  # noqa: E731
    fy = lambda y: 16 + (hi - (math.log10(max(y, y_range[0])) if log_y else y)) / (hi - lo) * (H - PAD - 16)  # noqa: E731
    out = [f'<text x="{x0 + W / 2}" y="12" text-anchor="middle" font-size="12">{title}</text>',
           f'<line x1="{x0 + PAD}" y1="{H - PAD}" x2="{x0 + W - 16}" y2="{H - PAD}" stroke="black"/>',
           f'<line x1="{x0 + PAD}" y1="16" x2="{x0 + PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle" font-size="11">entries R per layer and key/value head</text>',
           f'<text x="{x0 + 12}" y="{H / 2}" text-anchor="middle" font-size="11" transform="rotate(-90 {x0 + 12} {H / 2})">{y_label}</text>']
    for b in budgets:
        out.append(f'<text x="{fx(b):.1f}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">{b}</text>')
    ticks = [10.0**e for e in range(math.ceil(lo), math.floor(hi) + 1)] if log_y else [y_range[0] + i * (y_range[1] - y_range[0]) / 4 for i in range(5)]
    for t in ticks:
        out.append(f'<text x="{x0 + PAD - 4}" y="{fy(t) + 3:.1f}" text-anchor="end" font-size="10">{t:g}</text>')
    for name, pts in series.items():
        colour = COLOURS[name]
        path = " ".join(f"{'M' if i == 0 else 'L'}{fx(b):.1f},{fy(y):.1f}" for i, (b, y) in enumerate(pts))
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{fx(b):.1f}" cy="{fy(y):.1f}" r="3" fill="{colour}"/>' for b, y in pts]
    return out


def write_curve(result: dict, path: Path) -> None:
    rows = result["rows"]
    top1 = {m: curve(rows, m, "top1_agreement") for m in COLOURS}
    kl = {m: curve(rows, m, "kl") for m in COLOURS}
    kls = [y for pts in kl.values() for _, y in pts]
    parts = panel(0, "top token = prompted's (prefix: 1.0)", top1, False, (0.0, 1.0), "share of answer positions")
    parts += panel(W, "KL(prompted ‖ method) (prefix: ~1e-13)", kl, True,
                   (10.0 ** math.floor(math.log10(min(kls))), 10.0 ** math.ceil(math.log10(max(kls)))), "KL, nats")
    parts += [f'<text x="{2 * W - 150}" y="{40 + 16 * i}" font-size="11" fill="{c}">— {m}</text>' for i, (m, c) in enumerate(COLOURS.items())]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>', *parts, "</svg>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(svg) + "\n")


KINDS = {"evict": "#d62728", "compressed": "#1f77b4", "compressed, free split": "#17becf",
         "compressed + refine": "#2ca02c", "compressed, free split + refine": "#9467bd"}


def kind(method: str) -> str | None:
    """A refine-stage method's colour key (evict-P/4, compressed-P/8:split=free:refine=True, ...); None: prefix."""
    if method == "prefix" or "-" not in method:
        return None
    name, options = method.split("-", 1)[0], method.split(":")[1:]
    return name + (", free split" if "split=free" in options else "") + (" + refine" if "refine=True" in options else "")


def tradeoff(rows: list[dict]) -> list[dict]:
    """[{group, method, kind, bytes, kept, kl, cost}] means over the short tasks (prompted accuracy ≥ 0.2: tasks the
    model answers from the prompt) and over the long lists: bytes as a share of the prefix's of the same task,
    conversion seconds as a multiple of a plain forward over the prompt."""
    prefix = {r["task"]: r["patch_bytes"] for r in rows if r["method"] == "prefix"}
    out: dict = {}
    for r in rows:
        if kind(r["method"]) is None or r["prompted_accuracy"] < 0.2:
            continue
        group = "long lists" if r["task"].startswith("long_") else "short tasks"
        o = out.setdefault((group, r["method"]), {"group": group, "method": r["method"], "kind": kind(r["method"]),
                                                  "bytes": [], "kept": [], "kl": [], "cost": []})
        o["bytes"].append(r["patch_bytes"] / prefix[r["task"]])
        o["kept"].append(r["kept"])
        o["kl"].append(r["kl"])
        o["cost"].append(r["convert_seconds"] / r["forward_seconds"])
    return [{**o, **{k: sum(o[k]) / len(o[k]) for k in ("bytes", "kept", "kl", "cost")}, "tasks": len(o["kl"])}
            for o in out.values()]


def tradeoff_table(rows: list[dict]) -> list[list]:
    return [[f"{t['group']} ({t['tasks']})", t["method"], f"{t['bytes']:.3f}", f"{t['kept']:.2f}", f"{t['kl']:.3g}",
             f"{t['cost']:.0f}"] for t in tradeoff(rows)]


def write_tradeoff(result: dict, path: Path) -> None:
    """Two panels (short tasks, long lists): KL against bytes / prefix's, log-log, a dot per method and budget."""
    points = tradeoff(result["rows"])
    kls = [p["kl"] for p in points]
    lo, hi = 10.0 ** math.floor(math.log10(min(kls))), 10.0 ** math.ceil(math.log10(max(kls)))
    xs = [p["bytes"] for p in points]
    xlo, xhi = 2.0 ** math.floor(math.log2(min(xs))), 2.0 ** math.ceil(math.log2(max(xs)))
    xhi, hi = max(xhi, 2 * xlo), max(hi, 10 * lo)  # at least one step on each axis
    parts = []
    for i, group in enumerate(("short tasks", "long lists")):
        x0 = i * W
        fx = lambda b: x0 + PAD + (math.log2(b) - math.log2(xlo)) / (math.log2(xhi) - math.log2(xlo)) * (W - PAD - 16)  # noqa: E731
        fy = lambda y: 16 + (math.log10(hi) - math.log10(max(y, lo))) / (math.log10(hi) - math.log10(lo)) * (H - PAD - 16)  # noqa: E731
        parts += [f'<text x="{x0 + W / 2}" y="12" text-anchor="middle" font-size="12">{group}: KL(prompted ‖ method)</text>',
                  f'<line x1="{x0 + PAD}" y1="{H - PAD}" x2="{x0 + W - 16}" y2="{H - PAD}" stroke="black"/>',
                  f'<line x1="{x0 + PAD}" y1="16" x2="{x0 + PAD}" y2="{H - PAD}" stroke="black"/>',
                  f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle" font-size="11">patch bytes / the prefix\'s</text>']
        b = xlo
        while b <= xhi * 1.001:
            parts.append(f'<text x="{fx(b):.1f}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">{b:g}</text>')
            b *= 2
        for e in range(round(math.log10(lo)), round(math.log10(hi)) + 1):
            parts.append(f'<text x="{x0 + PAD - 4}" y="{fy(10.0 ** e) + 3:.1f}" text-anchor="end" font-size="10">1e{e}</text>')
        for p in (p for p in points if p["group"] == group):
            parts.append(f'<circle cx="{fx(p["bytes"]):.1f}" cy="{fy(p["kl"]):.1f}" r="4" fill="{KINDS[p["kind"]]}"/>')
    parts += [f'<text x="{2 * W + 8}" y="{30 + 16 * i}" font-size="11" fill="{c}">● {k}</text>' for i, (k, c) in enumerate(KINDS.items())]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W + 200}" height="{H}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>', *parts, "</svg>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(svg) + "\n")
