"""What a zoo run (benchmarks/zoo_bench.py) says against the Done-when lines of issues 23 and 25, read
from its <model>.json files: per model, diffc's cache frontier (eager and compiled, and eager only)
against the best peer at 30, 35 and 40 dB with the default `cache` row's own point; the int8 rows
against the bar (held-out PSNR >= 40 dB or within 3 dB of torchao int8 dynamic in the same run,
whichever is lower; sample accuracy within 2 points); W4A8 mixed at 1.2x uniform W4A8's size
(>= 30 dB); and every peer row that failed or changed nothing, with its reason.

    python benchmarks/zoo_summary.py benchmarks/results/<date>-cpu-x86_64/zoo [--out SUMMARY.md]
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from diffc.bench.frontier import LEVELS_DB, OURS, comparison

INT8_ROWS = ("quant", "quant:ort-int8")
TORCHAO_DYNAMIC = "torchao-int8@dynamic"
W4A8_MIXED = "quant[size_ratio=1.2;size_relative_to=w4a8]:mixed"
W4A8_UNIFORM = 'quant[formats=["w4a8"];min_psnr=null]:mixed'
INT8_FLOOR_DB, TORCHAO_MARGIN_DB, ACCURACY_POINTS, W4A8_FLOOR_DB, W4A8_SIZE = 40.0, 3.0, 2.0, 30.0, 1.2
PEER_FAILURES = ("failed", "no-op")


def _figure(value: float | None, fmt: str = ".2f") -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, fmt)


def _accuracy_holds(row: dict[str, Any], baseline: dict[str, Any]) -> bool | None:
    if row.get("accuracy") is None or baseline.get("accuracy") is None:
        return None
    return row["accuracy"] >= baseline["accuracy"] - ACCURACY_POINTS / 100 - 1e-9


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "**no**"


def frontier_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Cache frontier against the best peer (issue 23)", "",
             "| model | PSNR dB | diffc (eager + compiled) | diffc eager | best peer | its speed-up | diffc wins |",
             "|---|---|---|---|---|---|---|"]
    defaults = []
    for name, results in models.items():
        rows = results["rows"]
        both, eager = comparison(rows, OURS), comparison(rows, OURS[:1])
        for level in LEVELS_DB:
            key = f"{level:g}"
            entry = both["levels"][key]
            lines.append(f"| {name} | {key} | {_figure(entry['diffc'])} | {_figure(eager['levels'][key]['diffc'])} | "
                         f"{entry['best_peer'] or '-'} | {_figure(entry['best_peer_speedup'])} | "
                         f"{_yes(entry['diffc_wins'])} |")
        default = rows.get("cache")
        if default and default["status"] == "ok":
            defaults.append(f"| {name} | {_figure(default['speedup'])} | {_figure(default['psnr'], '.1f')} |")
    return lines + ["", "The default `cache` row's own point:", "", "| model | speed-up | PSNR dB |", "|---|---|---|",
                    *defaults]


def int8_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## int8 defaults against the bar (issue 25)", "",
             f"Bar: PSNR >= min({INT8_FLOOR_DB:g}, torchao int8 dynamic - {TORCHAO_MARGIN_DB:g}) dB; accuracy at most "
             f"{ACCURACY_POINTS:g} points below the baseline's.", "",
             "The worst image's own PSNR tells one sample flipping to other content from a uniformly worse row.", "",
             "| model | row | speed-up | PSNR dB | worst image dB | bar dB | torchao dynamic worst image dB "
             "| accuracy (baseline) | PSNR holds | accuracy holds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, results in models.items():
        rows = results["rows"]
        baseline, torchao = rows.get("baseline", {}), rows.get(TORCHAO_DYNAMIC)
        reference = torchao["psnr"] if torchao and torchao["status"] == "ok" else None
        bar = INT8_FLOOR_DB if reference is None else min(INT8_FLOOR_DB, reference - TORCHAO_MARGIN_DB)
        for spec in INT8_ROWS:
            row = rows.get(spec)
            if row is None:
                continue
            psnr = row.get("psnr")
            holds = None if row["status"] not in ("ok", "no-op") or psnr is None else psnr >= bar
            lines.append(f"| {name} | {spec} | {_figure(row.get('speedup'))} | {_figure(psnr, '.1f')} | "
                         f"{_figure(row.get('worst_psnr'), '.1f')} | {_figure(bar, '.1f')} | "
                         f"{_figure(torchao.get('worst_psnr') if torchao else None, '.1f')} | "
                         f"{_figure(row.get('accuracy'))} ({_figure(baseline.get('accuracy'))}) "
                         f"| {_yes(holds)} | {_yes(_accuracy_holds(row, baseline))} |")
    return lines


def w4a8_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## W4A8 mixed at 1.2x uniform W4A8's size (issue 25)", "",
             "| model | uniform W4A8 PSNR dB | mixed PSNR dB | mixed placeable size / uniform W4A8 | holds |",
             "|---|---|---|---|---|"]
    for name, results in models.items():
        rows = results["rows"]
        mixed, uniform = rows.get(W4A8_MIXED), rows.get(W4A8_UNIFORM)
        if mixed is None:
            continue
        size = ((mixed["details"].get("quant") or {}).get("placeable_size_ratio") or {}).get("ratio")
        holds = None if mixed["status"] != "ok" else (mixed["psnr"] >= W4A8_FLOOR_DB
                                                        and (size is None or size <= W4A8_SIZE + 1e-6))
        # the pass declines (quantizes nothing) where no placement within the size keeps the floor
        verdict = "**no** (declined: nothing quantized)" if mixed["details"].get("declined") else _yes(holds)
        lines.append(f"| {name} | {_figure(uniform.get('psnr') if uniform else None, '.1f')} | "
                     f"{_figure(mixed.get('psnr'), '.1f')} | {_figure(size)} | {verdict} |")
    return lines


def peer_failure_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Peer rows that failed or changed nothing", "", "| model | row | status | reason |", "|---|---|---|---|"]
    for name, results in models.items():
        for spec, row in results["rows"].items():
            if row["kind"] == "peer" and row["status"] in PEER_FAILURES:
                lines.append(f"| {name} | {spec} | {row['status']} | {(row['reason'] or '(none)').replace('|', '/')} |")
    return lines


def summarize(folder: Path) -> str:
    models = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
    if not models:
        raise SystemExit(f"no <model>.json in {folder}: run benchmarks/zoo_bench.py --out {folder} first")
    loads = [f"{name} {results['meta'].get('load_average_at_start', ['?'])[0]:.2f}" for name, results in models.items()
             if results["meta"].get("load_average_at_start")]
    header = [f"# Zoo run summary ({folder})", "", f"Load average at each model's start: {', '.join(loads)}.", ""]
    sections = [frontier_lines(models), int8_lines(models), w4a8_lines(models), peer_failure_lines(models)]
    return "\n".join(header + [line for section in sections for line in [*section, ""]])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(sys.argv[1:])
    text = summarize(args.folder)
    if args.out:
        args.out.write_text(text)
    print(text)
