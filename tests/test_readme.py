"""The README's first Python example runs as written, on a tiny text-to-image pipeline: the hub id it
names is served by tests/text_pipelines.py's StableDiffusion pipeline (nothing can be downloaded here)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline

import diffc
import text_pipelines

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def first_python_example() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_the_first_python_example_is_a_text_to_image_pipeline() -> None:
    code = first_python_example()
    assert HUB_ID in code and "diffc.optimize(pipe)" in code and "save_pretrained" in code


@pytest.mark.slow
def test_the_first_python_example_runs_as_written(tmp_path, monkeypatch) -> None:
    hub_from_pretrained = DiffusionPipeline.from_pretrained.__func__

    def from_pretrained(cls, name, **options):
        return text_pipelines.build("sd") if name == HUB_ID else hub_from_pretrained(cls, name, **options)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(first_python_example(), str(README), "exec"), scope)
    assert (tmp_path / "lighthouse.png").is_file()
    assert (tmp_path / "sd15-diffc" / "unet" / "manifest.json").is_file()
    assert isinstance(scope["pipe"].unet, diffc.OptimizedModel)
    assert [entry["pass"] for entry in scope["pipe"].unet.report] == ["cache"]
