"""Coverage of diffusers' denoiser classes: for each class the installed diffusers exports, capture,
identity (fp32, max abs diff <= 1e-5), the default cache pass in a hand-written loop, and ONNX
Runtime export (<= 1e-4), at the tiny config of diffc.models.catalog.

    python benchmarks/denoiser_coverage.py --out benchmarks/results/<date>-cpu-x86_64/coverage
    python benchmarks/denoiser_coverage.py --classes WanTransformer3DModel,SanaTransformer2DModel --out /tmp/cov

Each class runs in its own process under a time limit, and its row is written to coverage.json
as soon as it finishes: a second run skips the classes already there (delete a row to rerun it).
coverage.md is the table the README quotes."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from diffc.bench.coverage import CHECKS, CoverageRow, check_class
from diffc.models import catalog

ORT_GOAL, CACHE_GOAL = 30, 45


def run_one(class_name: str) -> None:
    print(json.dumps(check_class(class_name).to_json()))


def run_all(classes: list[str], out: Path, limit: float) -> dict[str, dict]:
    path = out / "coverage.json"
    rows: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for name in tqdm([c for c in classes if c not in rows], desc="classes"):
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                  timeout=limit, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else _crashed(name, done.stderr, done.returncode)
        except subprocess.TimeoutExpired:
            row = CoverageRow(name, errors={"run": f"did not finish within {limit:.0f} s"}).to_json()
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows[name] = row
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1, sort_keys=True))
    return rows


def _crashed(name: str, stderr: str, code: int) -> dict:
    tail = " ".join(stderr.strip().splitlines()[-3:])[-400:]
    return CoverageRow(name, errors={"run": f"process exited with {code}: {tail}"}).to_json()


def markdown(rows: dict[str, dict], classes: list[str]) -> str:
    counts = {check: sum(rows[c].get("checks", {}).get(check) == "ok" for c in classes if c in rows)
              for check in CHECKS}
    cache_and_identity = sum(all(rows[c].get("checks", {}).get(k) == "ok" for k in ("capture", "identity", "cache"))
                             for c in classes if c in rows)
    lines = [f"{len(classes)} denoiser classes in diffusers; capture {counts['capture']}, identity "
             f"{counts['identity']}, default cache pass {counts['cache']}, ONNX Runtime {counts['ort']}; capture + "
             f"identity + cache: {cache_and_identity} (goal {CACHE_GOAL}), ONNX Runtime: {counts['ort']} "
             f"(goal {ORT_GOAL}).", "",
             "| class | family | " + " | ".join(CHECKS) + " | cache: full steps, held-out dB | s | first error |",
             "|---|---|" + "---|" * len(CHECKS) + "---|---|---|"]
    for name in classes:
        row = rows.get(name, {})
        checks = row.get("checks", {})
        figures = row.get("figures", {})
        marks = [{"ok": "ok", "failed": "FAIL", "skipped": "-"}.get(checks.get(c, ""), "-") for c in CHECKS]
        cache = ""
        if "cache_declined" in figures:
            cache = f"declined, {figures.get('cache_held_out_psnr', '')}"
        elif "cache_full_steps" in figures:
            cache = f"{figures['cache_full_steps']}/{figures['cache_num_steps']}, {figures['cache_held_out_psnr']}"
        errors = row.get("errors", {})
        first = next((errors[c] for c in ("build", "run", *CHECKS) if c in errors), "")
        first = first.replace("|", "/")[:260]
        lines.append(f"| {name} | {row.get('family', '')} | " + " | ".join(marks) +
                     f" | {cache} | {row.get('seconds', '')} | {first} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("coverage"))
    parser.add_argument("--classes", help="comma-separated class names (default: every denoiser class)")
    parser.add_argument("--limit", type=float, default=600.0, help="seconds one class may take")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one)
        return
    classes = args.classes.split(",") if args.classes else catalog.denoiser_classes()
    rows = run_all(classes, args.out, args.limit)
    (args.out / "coverage.md").write_text(markdown(rows, classes))
    print(markdown(rows, classes))


if __name__ == "__main__":
    main()
