"""The whole comparison (issue: evaluation zoo and peers at their best): `diffc bench` on every zoo
model and both default models, with diffc's cache sweep and every peer at every setting, into
benchmarks/results/<date>-cpu-x86_64/zoo/. Each model's rows are kept as they finish, so an
interrupted run resumes where it stopped.

    OMP_NUM_THREADS=2 python benchmarks/zoo_bench.py [--models shapes-flux,digits-unet] [--pipelines ...] [--smoke]

--pipelines runs those rows only (`diffc bench`'s spelling; the default is the whole comparison), e.g.
`baseline,quant:ort-int8,cache+quant:ort-int8` for every model's int8 rows on ONNX Runtime in one run.

--smoke runs one zoo model with 2 steps, 2 prompts and a few rows: the harness end to end in a
minute or two, for CI-like machines.

--rerun-noisy 1.3 first drops every finished row whose per-round speed-ups spread wider than that
(highest over lowest: timed while something else ran), so the resumed run measures them again.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from diffc.bench.report import write_results
from diffc.cli import main as diffc_main
from diffc.models import zoo

DEFAULT_MODELS = ("digits-unet", "digits-dit")
# issue 25's 4-bit line: the mixed placement at 1.2x the size of uniform W4A8, beside uniform W4A8 as it comes
W4A8_ROWS = 'quant[formats=["w4a8"];min_psnr=null]:mixed,quant[size_ratio=1.2;size_relative_to=w4a8]:mixed'
FULL_PIPELINES = f"baseline,cache,cache-sweep,quant,quant:ort-int8,cache+quant,cache+quant:ort-int8,{W4A8_ROWS},peers"
SMOKE_PIPELINES = "baseline,cache,fbc@0.2,torchao-int8"


def drop_noisy_rows(path: Path, limit: float) -> list[str]:
    """Removes from a results file the rows whose per-round speed-ups spread wider than `limit`
    (highest over lowest); returns their names."""
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    noisy = [spec for spec, row in results["rows"].items()
             if row.get("speedup_spread") and row["speedup_spread"][1] > limit * row["speedup_spread"][0]]
    for spec in noisy:
        del results["rows"][spec]
    if noisy:
        write_results(path, results)
    return noisy


def run(models: list[str], out: Path, smoke: bool, pipelines: str | None = None,
        rerun_noisy: float | None = None) -> int:
    failures = []
    for model in models:
        if rerun_noisy is not None:
            for spec in drop_noisy_rows(out / f"{model}.json", rerun_noisy):
                print(f"{model}: {spec} timed with a spread over {rerun_noisy}: measuring it again", flush=True)
        chosen = pipelines or (SMOKE_PIPELINES if smoke else FULL_PIPELINES)
        arguments = ["bench", model, "--out", str(out), "--pipelines", chosen]
        if smoke:
            arguments += ["--steps", "2", "--seeds", "0", "--repeats", "1", "--labels", "0,1"]
            if model in zoo.ZOO:
                arguments += ["--prompts", "|".join(zoo.prompts(model, 2))]
        else:
            arguments += ["--steps", "20", "--seeds", "0,1", "--repeats", "3"]
        started = time.perf_counter()
        code = diffc_main(arguments)
        print(f"{model}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failures.append(model)
    return 1 if failures else 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated (default: the zoo and both default models)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pipelines", default=None, help="the rows to run (default: the whole comparison)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rerun-noisy", type=float, default=None, metavar="LIMIT",
                        help="first drop finished rows whose per-round speed-up spread (highest / lowest) exceeds it")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    chosen = args.models.split(",") if args.models else ([zoo.available()[0]] if args.smoke else
                                                        [*zoo.available(), *DEFAULT_MODELS])
    out = args.out or Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-cpu-x86_64" / "zoo"
    sys.exit(run(chosen, out, args.smoke, args.pipelines, args.rerun_noisy))
