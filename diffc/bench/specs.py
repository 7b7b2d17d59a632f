"""What a bench row is: `baseline`, a diffc pass pipeline or a peer at one of its settings.

    cache                                  diffc's cache pass with its defaults
    cache[full_fraction=0.5;forecast=true] the same pass with options (`;` between them)
    cache+quant:int4                       passes joined by `+`, target precision after `:` (torch backend)
    cache+quant:ort-int8                   or a whole target after `:` (backend-precision)
    cache:compile, cache+quant:int8+compile  the torch backend's segments under torch.compile
    deepcache@3                            a peer at one setting (`@`); alone, the peer's documented default
    peers                                  every peer at every setting of its sweep
    cache-sweep                            diffc's own sweep: cache budgets with and without forecast (on a
                                           UNet, also with DeepCache's shallowest cut), with a warm-up of
                                           full first steps, eager and compiled
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import DiffcError
from .peers import PEERS, Peer

DIFFC_PASSES = ("cache", "quant", "prune", "moe")
# "all" runs every pass that composes; quantization last, because it needs a full-precision graph
# to annotate. moe is left out: its routing per step range is a step plan of its own, which the cache
# schedule cannot nest (bench it as moe or moe+quant)
ALL_PASSES = ("prune", "cache", "quant")
DEFAULT_QUANT_PRECISION = "int8"
# the share of steps computed in full that the cache sweep asks for, each with and without forecast;
# below a quarter (1 / the cache pass's default max_gap of 4) the longest run of reused steps must grow
# with it (as DeepCache's N=5 reuses four steps in a row): those shares come with their max_gap
CACHE_SWEEP_FRACTIONS = (0.15, 0.2, 0.25, 0.35, 0.5, 0.7)
DEEP_SWEEP_MAX_GAP = {0.15: 8, 0.2: 8}
# on a UNet the sweep also caches all but the last layer of the outermost up block (DeepCache's
# branch 0), whose cached steps cost a fraction of the whole-block cut's, at the shares DeepCache's
# N = 2, 3, 4, 5 compute in full
SHALLOW_UNET_CUT = "cut=deep;recomputed_layers=1"
SHALLOW_SWEEP_FRACTIONS = (0.2, 0.25, 0.35, 0.5)
# the same pass with the torch backend's segments under torch.compile, as the torchao peers are
# compiled: at the high-fidelity end of the sweep, where kernel speed, not skipped work, decides
COMPILED_SWEEP_FRACTIONS = (0.5, 0.7, 0.85, 0.95)
# (share of steps in full, warm-up share of first steps always in full): on motion-wan one video in 20
# flips to other content under caching early in its trajectory, capping every schedule near 30 dB,
# while 70% full steps with the first half kept gave 37.5 dB at the speed of 70% without warm-up, and 75% 43.0 dB
# (compiled, 1.66x: past torchao int8 dynamic + compile at 40 dB, which the sweep without it missed)
WARMUP_SWEEP = ((0.6, 0.4), (0.7, 0.5), (0.75, 0.5))
COMPILE_SUFFIX = "compile"


@dataclass(frozen=True)
class DiffcPipeline:
    passes: tuple[str, ...]
    target: str
    options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (pass, ((option, value), ...))
    compiled: bool = False

    def pass_specs(self) -> list[Any]:
        """What `optimize(passes=...)` takes: a name, or {"pass": name, **options}."""
        given = dict(self.options)
        return [{"pass": name, **dict(given[name])} if name in given else name for name in self.passes]

    @property
    def family(self) -> str:
        """The frontier this row belongs to: the passes it runs, options aside."""
        return ("diffc " + "+".join(self.passes) + ("" if self.target == "torch" else f" ({self.target})")
                + (" + torch.compile" if self.compiled else ""))


@dataclass(frozen=True)
class PeerChoice:
    peer: Peer
    setting: str

    @property
    def family(self) -> str:
        return self.peer.name


def _option_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_pass(text: str, spec: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    name, bracket, rest = text.partition("[")
    if not bracket:
        return name, ()
    if not rest.endswith("]"):
        raise DiffcError(f"pipeline {spec!r}: options of {name!r} must close with ']', e.g. cache[full_fraction=0.5]")
    options = []
    for item in (part.strip() for part in rest[:-1].split(";")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise DiffcError(f"pipeline {spec!r}: option {item!r} of {name!r} is not key=value")
        options.append((key.strip(), _option_value(value.strip())))
    return name, tuple(options)


def parse_pipeline(spec: str) -> DiffcPipeline | PeerChoice | None:
    """`baseline` -> None; diffc pass pipelines -> DiffcPipeline; peers -> PeerChoice."""
    text = spec.strip()
    if text.lower() == "baseline":
        return None
    peer_name, at, setting = text.partition("@")
    if peer_name.lower() in PEERS:
        peer = PEERS[peer_name.lower()]
        setting = setting if at else peer.default
        if setting not in peer.settings:
            raise DiffcError(f"peer {peer.name!r} has no setting {setting!r}; its settings: {list(peer.settings)}")
        return PeerChoice(peer, setting)
    body, precision = text, ""
    if ":" in text.rsplit("]", 1)[-1]:
        body, _, precision = text.rpartition(":")
    before_flag, _, flag = precision.rpartition("+")
    compiled = flag.strip().lower() == COMPILE_SUFFIX
    if compiled:
        precision = before_flag
    parsed = [_parse_pass(part, spec) for part in body.split("+") if part]
    names = tuple(name.lower() for name, _ in parsed)
    if names == ("all",):
        names, parsed = ALL_PASSES, []
    unknown = [name for name in names if name not in DIFFC_PASSES]
    if not names or unknown:
        raise DiffcError(f"unknown pipeline {spec!r}: use baseline, 'all', diffc passes joined by '+' "
                         f"({', '.join(DIFFC_PASSES)}, e.g. cache+quant, quant:int4, cache[full_fraction=0.5]), "
                         f"'cache-sweep', a peer ({', '.join(PEERS)}; name@setting for one of its settings) or "
                         "'peers'")
    target = _row_target(precision, "quant" in names, spec)
    if compiled and not target.startswith("torch"):
        raise DiffcError(f"pipeline {spec!r}: torch.compile runs the torch backend's segments, not {target}'s; drop "
                         f"'+{COMPILE_SUFFIX}' or use a torch target (e.g. :int8+{COMPILE_SUFFIX})")
    return DiffcPipeline(names, target, tuple((name.lower(), options) for name, options in parsed if options),
                         compiled)


def _row_target(suffix: str, quantizes: bool, spec: str) -> str:
    """The target after `:`: a precision (the torch backend's) or a whole target; without one,
    torch at int8 when the row quantizes and fp32 otherwise."""
    from ..backends import BACKEND_NAMES, parse_target
    from ..backends.base import LOW_BIT

    text = suffix.strip().lower()
    if not text:
        return f"torch-{DEFAULT_QUANT_PRECISION}" if quantizes else "torch"
    target = text if text.partition("-")[0] in BACKEND_NAMES else f"torch-{text}"
    if parse_target(target).precision in LOW_BIT and not quantizes:
        raise DiffcError(f"pipeline {spec!r} names a low-bit target ({target}) but no quant pass, which writes what "
                         f"it lowers; write e.g. quant:{text}")
    return target


def peer_sweep() -> list[str]:
    return [f"{peer.name}@{setting}" if setting else peer.name for peer in PEERS.values() for setting in peer.settings]


def cache_sweep(unet: bool = False) -> list[str]:
    def gap(fraction: float) -> str:
        return f";max_gap={DEEP_SWEEP_MAX_GAP[fraction]}" if fraction in DEEP_SWEEP_MAX_GAP else ""

    # without the final-image floor (min_psnr): it backs every share it would break off to the same safer
    # schedule, so a sweep under it collapses onto a few points and never traces the frontier peers are
    # compared on; the default row ("cache") keeps it
    whole_blocks = [f"cache[full_fraction={fraction}{gap(fraction)};forecast={forecast};min_psnr=null]"
                    for fraction in CACHE_SWEEP_FRACTIONS for forecast in ("true", "false")]
    shallow = [f"cache[{SHALLOW_UNET_CUT};full_fraction={fraction}{gap(fraction)};forecast={forecast};min_psnr=null]"
               for fraction in SHALLOW_SWEEP_FRACTIONS for forecast in ("true", "false")] if unet else []
    cut_options = ["", f"{SHALLOW_UNET_CUT};"] if unet else [""]
    compiled = [f"cache[{cut}full_fraction={fraction};forecast=true;min_psnr=null]:{COMPILE_SUFFIX}"
                for cut in cut_options for fraction in COMPILED_SWEEP_FRACTIONS]
    warm = [f"cache[full_fraction={fraction};forecast=true;min_psnr=null;warmup={warmup}]{suffix}"
            for fraction, warmup in WARMUP_SWEEP for suffix in ("", f":{COMPILE_SUFFIX}")]
    return whole_blocks + shallow + compiled + warm


def _split_outside_brackets(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item.strip() for item in [*items, current] if item.strip()]


def split_pipelines(text: str, unet: bool = False) -> list[str]:
    """`baseline,cache,peers` -> the listed specs, `peers` and `cache-sweep` (its UNet rows when `unet`)
    expanded; baseline first."""
    specs: list[str] = []
    for item in _split_outside_brackets(text):
        expanded = peer_sweep() if item == "peers" else cache_sweep(unet) if item == "cache-sweep" else [item]
        for spec in expanded:
            parse_pipeline(spec)
            if spec not in specs:
                specs.append(spec)
    return ["baseline", *[spec for spec in specs if spec != "baseline"]]
