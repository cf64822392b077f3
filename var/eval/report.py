"""Write a benchmark report (:func:`var.eval.benchmark.run_benchmark`) as markdown, JSON and a PNG plot."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2 ** 20:.2f}"


def _num(x, fmt="{:.3g}") -> str:
    return "–" if x is None else fmt.format(x)


def _k(x):
    return None if x is None else 1e3 * x


def _with_interval(value, interval, fmt: str, scale: float = 1.0) -> str:
    """``value [lo, hi]`` (the row's 95% interval; older reports have none)."""
    if value is None:
        return "–"
    text = fmt.format(scale * value)
    return text if not interval else f"{text} [{fmt.format(scale * interval[0])}, {fmt.format(scale * interval[1])}]"


def to_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Sampler benchmark ({report['date']})", "",
             f"Machine: **{report['machine']}** ({report.get('load', 'load average unknown')}: other processes "
             f"shared the machine when the load exceeds the core count; timings are best-of to resist that).", "",
             f"{s['num_images']} images per row at batch {s['batch']} (seed {s['seed']}; images/s best of "
             f"{s.get('timed_runs', 1)} runs); latency = fastest of {s['repeats']} batch-1 calls; passes = forward "
             f"passes per sampler call. Quality: `fd` = Frechet distance on the features of "
             f"**{report['evaluator']}** (not an Inception FID; compare rows of one family only) against the "
             f"reference named below (FD is biased upward when images are few relative to the feature dimension); "
             f"`kid` = kernel distance on the same features (unbiased, so it can be negative: values near the "
             f"reference row's are within noise; its scale depends on the features); `agree` = "
             f"token agreement with the family's reference sampler for the same "
             f"seed. Brackets: 95% intervals (bootstrap for fd, subset spread for kid). Peak memory is {'CUDA peak allocation' if report['device'].startswith('cuda') else 'process peak RSS (includes Python and torch; compare rows)'}.",
             "", *([f"**Warning:** {report['warning']}", ""] if report.get("warning") else []),
             "`KV live` = peak K/V bytes of live tokens (`KV cache` = allocated); `PSNR` = compressed-cache images vs "
             "the full cache's (same seed); `NLL` = next-token NLL of the samples under the processed distribution; "
             "`attr` = share of text-to-image samples whose colour and shape the attribute classifier finds as "
             "prompted.",
             "",
             "| family | sampler | cache | budget | passes | images/s | latency (s) | peak mem (MiB) | KV cache (MiB) "
             "| KV live (MiB) | fd ↓ | kid×1e3 ↓ | agree | PSNR (dB) | NLL | attr |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        name = f"**{r['sampler']}**" if r.get("is_reference") else r["sampler"]
        name += " (compiled)" if r.get("compiled") else ""
        lines.append(f"| {r['family']} | {name} | {r['cache']} | {_num(r['budget'], '{:.0%}')} | {r['passes']} | "
                     f"{r['images_per_s']:.1f} | {r['latency_s']:.4f} | {_mib(r['peak_mem_bytes'])} | "
                     f"{_mib(r['cache_bytes'])} | {_mib(r.get('kv_live_bytes'))} | "
                     f"{_with_interval(r['fd'], r.get('fd_ci95'), '{:.3f}')} | "
                     f"{_with_interval(r.get('kid'), r.get('kid_ci95'), '{:.2f}', 1e3)} | "
                     f"{_num(r['token_agreement'], '{:.3f}')} | {_num(r.get('psnr_vs_full_db'), '{:.2f}')} | "
                     f"{_num(r.get('nll'), '{:.3f}')} | {_num(r.get('attr_acc'), '{:.3f}')} |")
    lines += ["", "References (bold rows are the reference samplers; their `fd` is the noise floor when the reference "
              "is the same sampler with another seed):", ""]
    lines += [f"- {fam}: {desc}" for fam, desc in report["references"].items()]
    if report["skipped"]:
        lines += ["", "Not benchmarked (registered, but no setup here has its models, or the run failed):", ""]
        lines += [f"- `{x['sampler']}`: {x['reason']}" for x in report["skipped"]]
    samplers = report.get("samplers", report.get("samplers_found", []))  # older reports: the discovered names
    policies = report.get("policies", report.get("policies_found", []))
    lines += ["", f"Registered samplers: {', '.join(samplers)}. Cache policies: {', '.join(policies)}.", ""]
    return "\n".join(lines)


def plot(report: dict, path: str | os.PathLike) -> Path:
    """Speed (images/s, log scale) vs quality (fd, lower is better), one colour per family."""
    path = Path(path)
    rows = [r for r in report["rows"] if r["fd"] is not None and r["images_per_s"] > 0]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(rows, report, path)
    families = list(dict.fromkeys(r["family"] for r in rows)) or ["(no rows)"]
    ncols = min(3, len(families))
    nrows = math.ceil(len(families) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), dpi=100, squeeze=False)
    for ax in axes.flat[len(families):]:
        ax.set_visible(False)
    for ax, fam in zip(axes.flat, families):  # one panel per family: fd is comparable within a family only
        sel = [r for r in rows if r["family"] == fam]
        for r in sel:
            ref = r.get("is_reference")
            ax.scatter(r["images_per_s"], r["fd"], marker="*" if ref else "o", s=140 if ref else 30,
                       color="C3" if ref else ("C0" if r["cache"] == "full" else "C2"), zorder=3)
            ax.annotate(_label(r), (r["images_per_s"], r["fd"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(fam, fontsize=9)
        ax.set_xlabel("images / s (log)", fontsize=8)
        ax.set_ylabel("fd (lower is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"speed vs quality: {report['machine'][:100]}\nfd on {report['evaluator'][:80]}; "
                 f"star = reference sampler, green = compressed KV cache", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _label(r: dict) -> str:
    if r["cache"] == "full":
        return r["sampler"]
    return f"{r['cache']} {r['budget']:.0%}" if r["budget"] is not None else r["cache"]


def _plot_pil(rows, report, path: Path) -> Path:
    """A plain scatter plot with PIL when matplotlib is not installed."""
    from PIL import Image, ImageDraw
    W, H, m = 900, 600, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, W - m, H - m], outline="black")
    d.text((m, 15), f"speed vs quality ({report['machine'][:100]})", fill="black")
    d.text((W // 2 - 60, H - 30), "images / s (log)", fill="black")
    d.text((5, m - 20), f"fd (lower is better), {report['evaluator'][:60]}", fill="black")
    if rows:
        xs = [math.log10(r["images_per_s"]) for r in rows]
        ys = [r["fd"] for r in rows]
        x0, x1 = min(xs) - 0.1, max(xs) + 0.1
        y0, y1 = 0.0, max(ys) * 1.1 or 1.0
        palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
        families = list(dict.fromkeys(r["family"] for r in rows))
        for r, x, y in zip(rows, xs, ys):
            px = m + (x - x0) / (x1 - x0) * (W - 2 * m)
            py = H - m - (y - y0) / (y1 - y0) * (H - 2 * m)
            c = palette[families.index(r["family"]) % len(palette)]
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=c)
            d.text((px + 5, py - 5), f"{r['sampler']} {r['cache'] if r['cache'] != 'full' else ''}", fill=c)
        for i, fam in enumerate(families):
            d.text((W - m - 250, m + 5 + 12 * i), fam, fill=palette[i % len(palette)])
        for v in range(math.floor(x0), math.ceil(x1) + 1):
            px = m + (v - x0) / (x1 - x0) * (W - 2 * m)
            if m <= px <= W - m:
                d.text((px, H - m + 5), f"1e{v}", fill="black")
    img.save(path)
    return path


def write_report(report: dict, out_dir: str | os.PathLike, tag: str) -> dict[str, Path]:
    """``<out_dir>/<tag>.md``, ``.json`` and ``.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{tag}.md", "json": out_dir / f"{tag}.json", "png": out_dir / f"{tag}.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    paths["md"].write_text(to_markdown(report) + f"\n![speed vs quality]({tag}.png)\n")
    plot(report, paths["png"])
    return paths


def merge_reports(reports: list[dict]) -> dict:
    """One report from runs of the same settings on the same machine (e.g. ``--families`` split over two runs)."""
    from var.errors import ConfigError
    first = reports[0]
    for other in reports[1:]:
        for key in ("machine", "device", "evaluator"):
            if other[key] != first[key]:
                raise ConfigError(f"cannot merge reports with different {key}: {first[key]!r} vs {other[key]!r}")
        for key in ("num_images", "batch", "repeats", "timed_runs", "budgets", "seed"):
            if other["settings"].get(key) != first["settings"].get(key):
                raise ConfigError(f"cannot merge reports with different {key}")
    merged = {**first, "rows": [r for rep in reports for r in rep["rows"]],
              "skipped": [x for rep in reports for x in rep["skipped"]],
              "references": {k: v for rep in reports for k, v in rep["references"].items()},
              "date": max(rep["date"] for rep in reports),
              "load": "; ".join(rep.get("load", "") for rep in reports)}
    merged["settings"] = dict(first["settings"])
    for key in ("sampler_settings", "setups"):  # setups: reports written before the sampler registry
        if any(key in rep["settings"] for rep in reports):
            merged["settings"][key] = {k: v for rep in reports for k, v in rep["settings"].get(key, {}).items()}
    seen, unique = set(), []
    for x in merged["skipped"]:  # a sampler skipped in one run may have run in the other
        if x["sampler"] not in seen and not any(r["sampler"] == x["sampler"] for r in merged["rows"]):
            seen.add(x["sampler"])
            unique.append(x)
    merged["skipped"] = unique
    return merged
