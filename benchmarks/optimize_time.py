"""How long `diffc.optimize(pipe)` takes on the embedded default models, per target (issue 24's
bound: the closed-loop decisions may not make it more than 1.5x slower than before them).

    OMP_NUM_THREADS=2 python benchmarks/optimize_time.py --out results.json [--targets torch,torch-int8]

Run it with PYTHONPATH pointing at another checkout to time that commit's code the same way (the
script uses only `diffc.optimize` and `diffc.models.load`). Each run calibrates afresh (no work_dir);
runs alternate between models so both see the same machine load. Results are added to --out as they
finish, and a rerun skips what it holds."""
import argparse
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import torch

import diffc
from diffc.models import load

MODELS = ("digits-unet", "digits-dit")


def commit_of(module_file: str) -> str:
    folder = Path(module_file).resolve().parent
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--targets", default="torch,torch-int8")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    commit = commit_of(diffc.__file__)
    runs = results.setdefault(commit, {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
                                                  f"{torch.__version__}", "seconds": {}})
    for repeat in range(args.repeats):
        for target in args.targets.split(","):
            for name in MODELS:
                key = f"{name} {target}"
                if len(runs["seconds"].get(key, [])) > repeat:
                    continue
                pipe = load(name)
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    diffc.optimize(pipe, target=target)
                seconds = time.perf_counter() - started
                runs["seconds"].setdefault(key, []).append(round(seconds, 1))
                print(f"{commit} {key}: {seconds:.1f} s", flush=True)
                args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
