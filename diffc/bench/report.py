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


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return format(value, fmt)


def markdown_table(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"# {meta['model']} on {meta['device']} ({meta['date']})", "",
             f"{meta['steps']} steps, seeds {meta['seeds']}, {meta['images']} images per round, "
             f"{meta['repeats']} timed rounds after a warm-up; speed-up = baseline / pipeline median denoiser "
             "time per image, both timed in the same alternating rounds. Peak memory: "
             f"{meta['memory_method']}. Fidelity: final images vs the unoptimized model, same seeds.", "",
             "| pipeline | kind | status | speed-up | ms/image | optimize s | peak MB | artifact MB | PSNR dB | SSIM "
             "| accuracy | FID | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"].values():
        note = row["reason"] or row["details"].get("peer", "")
        lines.append("| " + " | ".join([
            row["pipeline"], row["kind"], row["status"], _cell(row["speedup"], ".2f"), _cell(row["ms_per_image"], ".1f"),
            _cell(row["optimize_seconds"], ".1f"), _cell(row["peak_memory_mb"], ".1f"),
            _cell(row["artifact_mb"], ".2f"), _cell(row["psnr"], ".2f"), _cell(row["ssim"], ".4f"),
            _cell(row["accuracy"], ".3f"), _cell(row["fid"], ".2f"), note.replace("|", "/")]) + " |")
    return "\n".join(lines) + "\n"


def pareto_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"].values() if r["status"] == "ok" and r["speedup"]]
    cap = max([r["psnr"] for r in rows if r["psnr"] != float("inf")] + [40.0]) + 5
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        y = cap if r["psnr"] == float("inf") else r["psnr"]
        ax.scatter(r["speedup"], y, marker="o" if r["kind"] != "peer" else "s",
                   color="tab:blue" if r["kind"] == "diffc" else "tab:orange" if r["kind"] == "peer" else "black")
        ax.annotate(r["pipeline"], (r["speedup"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("denoiser speed-up vs unoptimized (same run)")
    ax.set_ylabel(f"PSNR vs unoptimized (dB; identical plotted at {cap:.0f})")
    ax.set_title(f"{results['meta']['model']} on {results['meta']['device']}: diffc (blue) vs peers (orange)", fontsize=9)
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
