"""The built-in prompt set: what `diffc.optimize(pipe)` calibrates a text-to-image pipeline on
when the user gives no prompts. Written for this project (prompts.txt): subjects, styles,
compositions and lengths interleaved, so evenly spaced picks differ along all four."""
from __future__ import annotations

import os
from pathlib import Path

from .store import CalibrationError

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
DEFAULT_PROMPT_COUNT = 8


def read_prompt_lines(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def builtin_prompts() -> list[str]:
    return read_prompt_lines(PROMPTS_FILE.read_text(encoding="utf-8"))


def default_prompts(count: int = DEFAULT_PROMPT_COUNT) -> list[str]:
    """`count` prompts spread evenly over the built-in set."""
    prompts = builtin_prompts()
    if not 1 <= count <= len(prompts):
        raise CalibrationError(f"the built-in prompt set has {len(prompts)} prompts; ask for 1 to {len(prompts)}, "
                               f"not {count}")
    return [prompts[(i * len(prompts)) // count] for i in range(count)]


def parse_prompts(value: str) -> list[str]:
    """A file of prompts (one per line) when `value` names a file, else comma-separated prompts
    (a prompt that holds a comma goes in a file)."""
    if os.path.isfile(value):
        prompts = read_prompt_lines(Path(value).read_text(encoding="utf-8"))
        if not prompts:
            raise CalibrationError(f"{value} holds no prompt (one per line; '#' lines are comments)")
        return prompts
    prompts = [p.strip() for p in value.split(",") if p.strip()]
    if not prompts:
        raise CalibrationError(f"no prompt in {value!r}: give comma-separated prompts or a file with one per line")
    return prompts


def held_out_prompts(count: int = 4) -> list[str]:
    """`count` prompts of the built-in set that `default_prompts()` never picks (half a stride
    after each of its picks): for judging on prompts calibration did not see."""
    prompts = builtin_prompts()
    stride = len(prompts) / DEFAULT_PROMPT_COUNT
    picks = [int(i * stride + stride / 2) for i in range(DEFAULT_PROMPT_COUNT)]
    return [prompts[p] for p in picks[:count]]
