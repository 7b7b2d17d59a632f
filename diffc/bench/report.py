"""Bench results: the JSON file rows are appended to, its markdown table and the Pareto plot of
speed-up against fidelity."""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def device_label(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_results(path: Path, results: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1, default=float))
    temporary.replace(path)  # a crash mid-write never leaves a half-written results file


def _placement_note(quant: dict[str, Any] | None) -> str:
    if not quant:
        return ""
    formats = ", ".join(f"{count} {name}" for name, count in (quant.get("layers_quantized") or {}).items() if count)
    placeable = quant.get("placeable_size_ratio") or {}
    relative = (f"; placeable layers {placeable['ratio']:.2f}x their {placeable['relative_to']} size"
                if placeable.get("relative_to", "fp32") != "fp32" else "")
    weight_only = sum((quant.get("weight_only_layers") or {}).values())
    return (f"layers: {formats or 'none'} quantized, {quant.get('layers_protected')} kept at full-precision "
            f"activations ({weight_only} of them with int8 weights); weights {quant['size_ratio']:.2f} of fp32{relative}")


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return format(value, fmt)


def _frontier_lines(results: dict[str, Any]) -> list[str]:
    frontier = results.get("frontier")
    if not frontier:
        return []
    lines = ["", f"## Frontier: speed-up at which {frontier['ours']} and the best peer reach each PSNR", "",
             "(each method at its best setting, or two of its settings mixed over the images: time and squared error averaged; '-' = never reached)", "",
             "| PSNR dB | diffc | best peer | its speed-up | diffc reaches it |", "|---|---|---|---|---|"]
    for level, entry in frontier["levels"].items():
        wins = "-" if entry["diffc_wins"] is None else "yes" if entry["diffc_wins"] else "**no**"
        lines.append(f"| {level} | {_cell(entry['diffc'], '.2f')} | {entry['best_peer'] or '-'} | "
                     f"{_cell(entry['best_peer_speedup'], '.2f')} | {wins} |")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    load = meta.get("load_average_at_start")
    lines = [f"# {meta['model']} on {meta['device']} ({meta['date']})", "",
             f"{meta['steps']} steps, seeds {meta['seeds']}, {meta['images']} images per round, "
             f"{meta['repeats']} timed rounds after a warm-up; speed-up = baseline / pipeline median denoiser "
             "time per image, both timed in the same alternating rounds (spread: lowest-highest per-round ratio; "
             "each row's own baseline ms/image is given). Peak memory: "
             f"{meta['memory_method']}. Fidelity: final images vs the unoptimized model, same seeds. "
             "worst image: the lowest PSNR of one image (a video: all its frames) against its own reference. "
             "no-op: images bit-identical to the baseline's."
             + (f" Load average at start {load[0]:.2f}, at end {meta['load_average_at_end'][0]:.2f}."
                if load and meta.get("load_average_at_end") else ""), "",
             "| pipeline | kind | status | speed-up | spread | ms/image | baseline ms/image | optimize s | peak MB "
             "| artifact MB | PSNR dB | worst image dB | SSIM | accuracy | FID | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"].values():
        note = row["reason"] or row["details"].get("peer", "") or _placement_note(row["details"].get("quant"))
        spread = row.get("speedup_spread")
        lines.append("| " + " | ".join([
            row["pipeline"], row["kind"], row["status"], _cell(row["speedup"], ".2f"),
            f"{spread[0]:.2f}-{spread[1]:.2f}" if spread else "-", _cell(row["ms_per_image"], ".1f"),
            _cell(row.get("baseline_ms_per_image"), ".1f"), _cell(row["optimize_seconds"], ".1f"),
            _cell(row["peak_memory_mb"], ".1f"), _cell(row["artifact_mb"], ".2f"), _cell(row["psnr"], ".2f"),
            _cell(row.get("worst_psnr"), ".2f"), _cell(row["ssim"], ".4f"), _cell(row["accuracy"], ".3f"),
            _cell(row["fid"], ".2f"),
            note.replace("|", "/")]) + " |")
    return "\n".join(lines + _frontier_lines(results)) + "\n"


def pareto_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .frontier import frontiers, pareto

    rows = [r for r in results["rows"].values() if r["status"] in ("ok", "no-op") and r["speedup"]]
    cap = max([r["psnr"] for r in rows if r["psnr"] != float("inf")] + [40.0]) + 5
    fig, ax = plt.subplots(figsize=(7, 5))
    colours = plt.get_cmap("tab20")
    for index, (family, points) in enumerate(sorted(frontiers(results["rows"]).items())):
        front = pareto(points)
        ours = family.startswith("diffc")
        ax.plot([s for s, _ in front], [cap if q == float("inf") else q for _, q in front],
                marker="o" if ours else "s", color="tab:blue" if family == "diffc cache" else colours(index % 20),
                linewidth=2.5 if ours else 1.2, markersize=4, label=family)
    for r in rows:
        y = cap if r["psnr"] == float("inf") else r["psnr"]
        ax.scatter(r["speedup"], y, s=10, color="black" if r["kind"] == "baseline" else "grey", zorder=3)
    for level in (30, 35, 40):
        ax.axhline(level, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("denoiser speed-up vs unoptimized (same run)")
    ax.set_ylabel(f"PSNR vs unoptimized (dB; identical plotted at {cap:.0f})")
    ax.set_title(f"{results['meta']['model']} on {results['meta']['device']}: frontier per method", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    stem = results["meta"]["model"]
    write_results(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text(markdown_table(results))
    try:
        pareto_plot(results, out / f"{stem}.png")
    except ModuleNotFoundError as missing:
        # The table and JSON are the results; the plot is a view of them and needs the `bench` extra.
        log.warning("no Pareto plot written (%s); install it with: pip install 'diffc[bench]'", missing)
