"""Whether a pipeline still samples the way its calibration did.

A step schedule (which steps reuse cached work) was chosen, and its error measured, on the
trajectories of one sampler. Another scheduler class or step count is fine: the schedule follows
timesteps. Settings that change what a step does with the same denoiser output are not
(`clip_sample`, `thresholding` clip the predicted sample; `prediction_type` reads the output as
something else): the error was never judged under them, and may be large. The optimized model
then runs such a loop in full (exact, no speed-up) and says so once."""
from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Any

# the settings, and the value that means "not applied" for a scheduler class that lacks one
STEP_SETTINGS: dict[str, Any] = {"prediction_type": None, "clip_sample": False, "thresholding": False}


def step_settings(scheduler: Any) -> dict[str, Any]:
    """The step settings a scheduler applies (a setting its class does not take is not applied)."""
    takes = inspect.signature(type(scheduler).__init__).parameters
    config = getattr(scheduler, "config", {})
    return {key: config.get(key, off) if key in takes else off for key, off in STEP_SETTINGS.items()}


class SamplerWatch:
    """Compares the scheduler of the pipeline an optimized model was calibrated in with the step
    settings of calibration, at the start of each loop."""

    def __init__(self, pipeline: Any, calibrated: dict[str, Any]) -> None:
        self._pipeline = weakref.ref(pipeline)
        self.calibrated = dict(calibrated)
        self._warned: set[tuple[Any, ...]] = set()

    def changes(self) -> dict[str, tuple[Any, Any]]:
        """{setting: (calibrated value, current value)} for the settings that differ now."""
        pipeline = self._pipeline()
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is None:
            return {}
        current = step_settings(scheduler)
        return {key: (self.calibrated.get(key, off), current[key]) for key, off in STEP_SETTINGS.items()
                if current[key] != self.calibrated.get(key, off)
                and None not in (current[key], self.calibrated.get(key, off))}

    def judged(self) -> bool:
        """False (with one warning per distinct change) when the pipeline's scheduler now applies
        step settings calibration did not."""
        changes = self.changes()
        if not changes:
            return True
        key = tuple(sorted(changes.items()))
        if key not in self._warned:
            self._warned.add(key)
            said = ", ".join(f"{name}={now!r} (calibrated with {then!r})" for name, (then, now) in changes.items())
            warnings.warn(f"the pipeline's scheduler now samples with {said}: the optimized model's step schedule was "
                          "chosen and its error measured without it, so this loop runs every step in full (exact, no "
                          "speed-up). Optimize again with this scheduler in the pipeline (diffc.optimize(pipe)) to "
                          "cache under it.", stacklevel=4)
        return False
