"""Command line: diffc optimize | inspect | export | bench."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import DiffcError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffc", description="A compiler for diffusion denoisers.")
    commands = parser.add_subparsers(dest="command", required=True)

    opt = commands.add_parser("optimize", help="optimize a model and print a before/after table")
    opt.add_argument("model", nargs="?", default=None,
                     help="an embedded model name (see `diffc optimize --list`) or a diffusers pipeline folder; "
                          "default: the first embedded model")
    opt.add_argument("--target", default="torch", help="<backend>[-<precision>], e.g. torch, torch-bf16")
    opt.add_argument("--passes", default="default",
                     help="a preset name, comma-separated pass names, or a JSON list of {\"pass\": name, ...}")
    opt.add_argument("--out", default=None, help="folder for the artifact and the side-by-side PNG")
    opt.add_argument("--steps", type=int, default=None, help="denoising steps per image (default: the pipeline's)")
    opt.add_argument("--seed", type=int, default=1000,
                     help="seed of the compared images (calibration runs seed 0: the images are judged on others)")
    opt.add_argument("--labels", default=None,
                     help="class labels to generate, comma-separated (class-conditional models; default 0-9)")
    _add_prompt_arguments(opt)
    opt.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    opt.add_argument("--device", default=None)
    opt.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="run the torch backend's segments under torch.compile (default: on CUDA only; compiling "
                          "happens in the untimed warm-up round)")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    opt.add_argument("--work-dir", default=None,
                     help="where calibration and the graph after each pass are kept, so an interrupted run resumes "
                          "when started again (default with --out: <out>.work, removed once the artifact is written)")
    opt.add_argument("--list", action="store_true", help="list the embedded models and exit")

    ins = commands.add_parser("inspect", help="print the block table of a model: params and FLOPs per block")
    ins.add_argument("model", help="an embedded model name, a diffusers model/pipeline folder, or a diffc artifact")
    ins.add_argument("--kind", default=None, help="only blocks of this kind (stage, resnet, attention, ...)")

    exp = commands.add_parser("export", help="write a deployment folder: artifact, ONNX models or TensorRT engines "
                                             "per segment, schedule, Triton model repository, README")
    exp.add_argument("model", help="a diffc artifact folder, an embedded model name or a diffusers pipeline folder")
    exp.add_argument("--target", default=None, help="<backend>[-<precision>] to optimize for (not for an artifact, "
                                                    "which keeps its own); default torch")
    exp.add_argument("--passes", default="default", help="as for `diffc optimize` (not for an artifact)")
    exp.add_argument("--out", required=True, help="the deployment folder to write")
    exp.add_argument("--device", default=None)
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    _add_prompt_arguments(exp)

    bench = commands.add_parser("bench", help="compare pass pipelines and peers on speed, size and fidelity")
    bench.add_argument("model", help="an embedded model name, a zoo model name (diffc.models.zoo) or a diffusers "
                                     "pipeline folder")
    bench.add_argument("--pipelines", default="baseline,cache,quant,prune,moe,cache+quant,all,peers",
                       help="comma-separated: baseline, diffc passes joined by '+' (cache, quant[:int4], prune, moe, "
                            "all; options in brackets: cache[full_fraction=0.5;forecast=true]; ':compile' after "
                            "them for torch.compile'd segments), 'cache-sweep' for "
                            "diffc's cache settings, peer names (fbc, taylorseer, magcache, fastercache, pab, "
                            "seacache, deepcache, cache-dit, torchao-...; name@setting for one setting) or 'peers' "
                            "for every peer at every setting")
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--seeds", default="0,1", help="comma-separated seeds; every seed generates all --labels")
    bench.add_argument("--labels", default="0,1,2,3,4,5,6,7,8,9", help="class labels to generate")
    bench.add_argument("--prompts", default=None, help="'|'-separated prompts to generate for a text pipeline "
                                                      "(a zoo model: by default 10 of its data set's prompts)")
    bench.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--out", required=True, help="results folder; rows already in it (same settings) are kept")

    args = parser.parse_args(argv)
    try:
        return {"optimize": _optimize, "inspect": _inspect, "export": _export, "bench": _bench}[args.command](args)
    except DiffcError as exc:
        print(f"diffc: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader closed the pipe (`diffc inspect ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError) as exc:
        # what a model, pipeline or file raises about the arguments it was given
        if os.environ.get("DIFFC_TRACEBACK"):
            raise
        print(f"diffc: error: {type(exc).__name__}: {exc}\n(set DIFFC_TRACEBACK=1 to see where it was raised)",
              file=sys.stderr)
        return 2


def _add_prompt_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--prompts", default=None,
                         help="text pipelines: calibration prompts, a file (one per line) or comma-separated "
                              "(default: 8 of the built-in set); the compared images use the first 4 (default: 4 "
                              "built-in prompts calibration does not see)")
    command.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    command.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")


def _parse_passes(text: str) -> Any:
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DiffcError(f"--passes {text!r} is not valid JSON ({exc}); write e.g. '[{{\"pass\": \"cache\"}}]' "
                             "or comma-separated names") from None
    if "," in text or text in ("", "none"):
        return [p for p in text.split(",") if p and p != "none"]
    return text


def _load_pipeline(name: str | None) -> tuple[Any, str]:
    from . import models
    from .ir import find_denoiser

    if name is None:
        available = models.available()
        if not available:
            raise DiffcError("no embedded model is installed; pass a diffusers pipeline folder")
        name = available[0]
    if name in models.available():
        pipe = models.load(name)
    elif Path(name).is_dir():
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(name)
    else:
        raise DiffcError(f"model {name!r} is neither an embedded model ({', '.join(models.available())}) "
                         "nor a folder")
    _, attribute = find_denoiser(pipe)
    if attribute is None:
        raise DiffcError(f"{name} is a bare model; `diffc optimize` needs a pipeline to generate images")
    return pipe, attribute


@dataclass
class _ImageRequest:
    """What the command line asks of a pipeline: the compared images (class labels, prompts or
    unconditional samples, seed, steps, size) and what calibration runs on."""

    pipe: Any
    labels: list[int] | None
    prompts: list[str] | None  # --prompts: calibration runs on them and the compared images use the first 4
    shown_prompts: list[str] | None
    steps: int | None
    size: dict[str, int]
    seed: int

    @classmethod
    def of(cls, pipe: Any, args: argparse.Namespace) -> "_ImageRequest":
        from .calibration.prompts import held_out_prompts, parse_prompts

        parameters = inspect.signature(pipe.__call__).parameters
        name = type(pipe).__name__
        size = {key: getattr(args, key) for key in ("height", "width") if getattr(args, key, None) is not None}
        if any(key not in parameters for key in size):
            raise DiffcError(f"{name} takes no height/width; drop --height/--width")
        for key, value in [*size.items(), ("steps", getattr(args, "steps", None))]:
            if value is not None and value < 1:
                raise DiffcError(f"--{key} must be a positive integer, got {value}")
        labels_text, prompts_text = getattr(args, "labels", None), args.prompts
        common = dict(pipe=pipe, steps=getattr(args, "steps", None), size=size, seed=getattr(args, "seed", 0))
        if "class_labels" in parameters:
            if prompts_text is not None:
                raise DiffcError(f"{name} is class-conditional: give class labels with --labels, not --prompts")
            return cls(labels=_parse_labels(labels_text or "0,1,2,3,4,5,6,7,8,9", pipe), prompts=None,
                       shown_prompts=None, **common)
        if labels_text is not None:
            raise DiffcError(f"{name} is not class-conditional: "
                             + ("give prompts with --prompts" if "prompt" in parameters else "drop --labels"))
        if "prompt" not in parameters:
            if prompts_text is not None:
                raise DiffcError(f"{name} takes no prompt; drop --prompts")
            return cls(labels=None, prompts=None, shown_prompts=None, **common)
        prompts = parse_prompts(prompts_text) if prompts_text is not None else None
        return cls(labels=None, prompts=prompts, shown_prompts=(prompts or held_out_prompts())[:4], **common)

    def calibration(self, passes: Any, work_dir: Path | None) -> dict[str, Any]:
        """optimize's calibration arguments: its defaults unless prompts, steps or size were given."""
        from .calibration import collect
        from .passes import PassManager

        if not any("calibrated" in p.requirements() for p in PassManager(passes).passes):
            return {}
        if self.prompts is None and self.steps is None and not self.size:
            return {}
        conditions = [{"prompt": prompt, **self.size} for prompt in self.prompts or []] or None
        if conditions is None and self.size:
            from .calibration.prompts import default_prompts

            conditions = [{"prompt": prompt, **self.size} for prompt in default_prompts()] if self.shown_prompts \
                else [dict(self.size)]
        steps = self.steps or inspect.signature(self.pipe.__call__).parameters["num_inference_steps"].default
        out = work_dir / "calibration" if work_dir is not None else None
        return {"calibration": collect(self.pipe, conditions=conditions, num_steps=steps, out=out)}

    def generate(self, pipe: Any) -> Any:
        kwargs: dict[str, Any] = dict(self.size, generator=torch.Generator().manual_seed(self.seed), output_type="np")
        if self.steps is not None:
            kwargs["num_inference_steps"] = self.steps
        if self.labels is not None:
            kwargs["class_labels"] = self.labels
        elif self.shown_prompts is not None:
            kwargs["prompt"] = self.shown_prompts
        else:
            kwargs["batch_size"] = 4
        return pipe(**kwargs).images

    @property
    def num_images(self) -> int:
        return len(self.labels or self.shown_prompts or [None] * 4)

    def describe(self) -> str:
        steps = self.steps or inspect.signature(self.pipe.__call__).parameters["num_inference_steps"].default
        what = f"labels {self.labels}" if self.labels is not None else \
            f"prompts {self.shown_prompts}" if self.shown_prompts is not None else "unconditional"
        return f"steps: {steps}   images: {self.num_images} ({what}, seed {self.seed})"


def _parse_labels(text: str, pipe: Any) -> list[int]:
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DiffcError(f"--labels {text!r}: class labels are comma-separated integers, e.g. 0,3,7") from None
    if not labels:
        raise DiffcError("--labels holds no label; give comma-separated integers, e.g. 0,3,7")
    count = getattr(pipe, "num_classes", None)
    if count is not None and not all(0 <= label < count for label in labels):
        raise DiffcError(f"--labels {text!r}: this model has classes 0 to {count - 1}")
    return labels


def cpu_target_advice(target, device: str | None) -> str | None:
    """What to say when a low-bit torch target is asked for on a CPU: torch runs it as a simulation
    there (no int8 or fp8 matmul faster than fp32), so it measures fidelity, not speed."""
    import torch

    from .backends.base import LOW_BIT

    on_cpu = torch.device(device).type == "cpu" if device else not torch.cuda.is_available()
    if target.backend != "torch" or target.precision not in LOW_BIT or not on_cpu:
        return None
    if target.precision in ("int8", "mixed"):
        return (f"torch-{target.precision} on a CPU simulates its quantization in fp32 (torch has no int8 matmul "
                f"faster than fp32 here), so it runs slower than the original; --target ort-{target.precision} runs "
                "the same quantized model on ONNX Runtime's integer kernels")
    return (f"torch-{target.precision} on a CPU simulates its quantization in fp32 (no {target.precision} kernels "
            "here): use it to check fidelity; its speed needs a GPU")


def _optimize(args: argparse.Namespace) -> int:
    from . import models
    from .api import optimize
    from .backends import parse_target
    from .evaluate import compare, format_table, side_by_side

    if args.list:
        print("\n".join(models.available()))
        return 0
    advice = cpu_target_advice(parse_target(args.target), args.device)
    if advice:
        print(f"note: {advice}", file=sys.stderr)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise DiffcError(f"{out} already exists; choose another --out or pass --overwrite")
    pipe, attribute = _load_pipeline(args.model)
    request = _ImageRequest.of(pipe, args)
    work_dir = Path(args.work_dir) if args.work_dir else Path(f"{out}.work") if out is not None else None
    started = time.perf_counter()
    passes = _parse_passes(args.passes)
    fast = optimize(pipe, target=args.target, passes=passes, device=args.device, progress=True, work_dir=work_dir,
                    compile=args.compile, **request.calibration(passes, work_dir))
    optimize_seconds = time.perf_counter() - started
    scorer = models.load_scorer() if args.model is None or args.model in models.available() else None
    labels = request.labels
    score = (lambda images: {"accuracy": scorer.accuracy(images, labels)}) if scorer and labels else None
    result = compare(pipe, attribute, fast, request.generate, rounds=args.rounds, score=score)
    print(f"model: {args.model or models.available()[0]}   target: {fast.target}   passes: "
          f"{[a['pass'] for a in fast.report] or 'none'}   {request.describe()}")
    print(format_table(result))
    print(f"optimize() took {optimize_seconds:.1f} s")
    for entry in fast.report:
        print(f"pass {entry['pass']}: {json.dumps(entry['report'])[:300]}")
    if out is not None:
        fast.save(out / "model", overwrite=args.overwrite)
        side_by_side(result.images[0], result.images[1], str(out / "side_by_side.png"))
        print(f"wrote {out / 'model'} and {out / 'side_by_side.png'} (top: original, bottom: optimized)")
        if not args.work_dir and work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import models
    from .bench import NOT_APPLICABLE, BenchSettings, run_bench, split_pipelines
    from .models import zoo

    prompts = tuple(p.strip() for p in args.prompts.split("|") if p.strip()) if args.prompts else ()
    calibration_prompts: tuple[str, ...] = ()
    if args.model in zoo.ZOO:
        pipe, attribute, scorer = zoo.load(args.model), zoo.spec(args.model).denoiser_attribute, \
            zoo.load_scorer(args.model)
        prompts = prompts or tuple(zoo.prompts(args.model, 10))
        # calibration on prompts the bench does not evaluate, wherever the data set has enough of them
        calibration_prompts = tuple(zoo.prompts(args.model, 8, offset=len(prompts)))
    else:
        pipe, attribute = _load_pipeline(args.model)
        scorer = models.load_scorer() if args.model in models.available() else None
    denoiser = getattr(pipe, attribute)
    pipelines = split_pipelines(args.pipelines, unet=hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks"))
    settings = BenchSettings(steps=args.steps, seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
                             labels=tuple(int(x) for x in args.labels.split(",") if x.strip()), prompts=prompts,
                             calibration_prompts=calibration_prompts, repeats=args.repeats, device=args.device)
    results = run_bench(pipe.to(args.device), attribute, Path(args.model).name, pipelines, Path(args.out), settings,
                        scorer)
    failed = [r["pipeline"] for r in results["rows"].values() if r["status"] not in ("ok", NOT_APPLICABLE)]
    print(f"wrote {Path(args.out) / Path(args.model).name}.{{md,json,png}}"
          + (f"; failed or no-op: {', '.join(failed)} (reasons in the table)" if failed else ""))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .runtime.export import export_deployment

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DiffcError(f"{out} already exists; choose another --out or pass --overwrite")
    if (Path(args.model) / "manifest.json").is_file():
        if args.target is not None or args.passes != "default":
            raise DiffcError(f"{args.model} is an artifact, already optimized for its own target and passes; drop "
                             "--target/--passes, or export the original model with them")
        source: Any = args.model
    else:
        from .api import optimize
        from .backends import parse_target

        parse_target(args.target or "torch")
        pipe, _ = _load_pipeline(args.model)
        request = _ImageRequest.of(pipe, args)
        passes = _parse_passes(args.passes)
        source = optimize(pipe, target=args.target or "torch", passes=passes, device=args.device, progress=True,
                          **request.calibration(passes, None))
    path = export_deployment(source, out, overwrite=args.overwrite, progress_bar=True)
    print(f"wrote {path}: serve {path / 'triton'} with Triton, or diffc.load('{path}'); see {path / 'README.md'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from . import models
    from .ir import capture, find_denoiser

    path = Path(args.model)
    if args.model in models.available():
        denoiser, _ = find_denoiser(models.load(args.model))
        dg = capture(denoiser)
    elif (path / "manifest.json").is_file():
        from .runtime import load_plan, read_manifest

        dg = load_plan(path, read_manifest(path)).graph
    elif path.is_dir():
        from diffusers import DiffusionPipeline

        loaded: Any = DiffusionPipeline.from_pretrained(path) if (path / "model_index.json").is_file() else None
        if loaded is None:
            raise DiffcError(f"{path} has no model_index.json (pipeline) or manifest.json (diffc artifact)")
        denoiser, _ = find_denoiser(loaded)
        dg = capture(denoiser)
    else:
        raise DiffcError(f"{args.model!r} is not an embedded model ({', '.join(models.available())}), "
                         "a pipeline folder or a diffc artifact")
    print(f"{dg.signature.model_class}: {dg.num_parameters():,} parameters")
    print("inputs: " + ", ".join(f"{i.name} {tuple(i.shape)} [{i.role}]" for i in dg.signature.inputs))
    rows = [b for b in dg.blocks if args.kind is None or b.kind == args.kind]
    width = max([len(b.name) for b in rows] + [5])
    print(f"{'block'.ljust(width)}  {'kind':<17} {'params':>10} {'MFLOPs':>10}  residual")
    for b in rows:
        residual = f"{b.residual.add} (skip {b.residual.skip})" if b.residual else "-"
        print(f"{b.name.ljust(width)}  {b.kind:<17} {b.num_params:>10,} {b.flops / 1e6:>10.2f}  {residual}")
    print(f"{len(rows)} blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
