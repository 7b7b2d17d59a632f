"""Knowing which step of a denoising loop a denoiser call belongs to."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class StepTracker:
    """Follows the timestep sequence of the calls: samplers walk from high noise to low, so a
    smaller timestep is the next step, an equal one another call of the same step (e.g. separate
    conditional and unconditional passes), and a larger one the start of a new loop.

    `begin_loop` starts a loop explicitly (and may state its length); `reset` forgets everything."""

    step: int = -1
    last_timestep: float | None = None
    num_steps: int | None = None
    call_in_step: int = 0
    # the timestep of each step of the current loop so far
    step_timesteps: list[float | None] = field(default_factory=list)

    def observe(self, timestep: float | None) -> bool:
        """Records a call; returns True when it starts a new loop."""
        starts_loop = (self.step < 0 or timestep is None or self.last_timestep is None
                       or timestep > self.last_timestep)
        if starts_loop:
            announced = self.step < 0 and self.num_steps is not None
            self.step, self.call_in_step, self.step_timesteps = 0, 0, [timestep]
            if not announced:
                self.num_steps = None
        elif timestep < self.last_timestep:
            self.step += 1
            self.call_in_step = 0
            self.step_timesteps.append(timestep)
        else:
            self.call_in_step += 1
        self.last_timestep = timestep
        return starts_loop

    def at_last_step(self, calibrated_timesteps: Sequence[float] = ()) -> bool:
        """Whether the current call belongs to the loop's last step: the step announced last by
        begin_loop(n), or, in a loop that has followed `calibrated_timesteps` exactly so far, the
        step at the last of them (the calibrated loop ended there)."""
        if self.step < 0:
            return False
        if self.num_steps is not None:
            return self.step == self.num_steps - 1
        if len(self.step_timesteps) != len(calibrated_timesteps) or None in self.step_timesteps:
            return False
        return all(math.isclose(seen, expected, rel_tol=1e-6, abs_tol=1e-9)
                   for seen, expected in zip(self.step_timesteps, calibrated_timesteps))

    def begin_loop(self, num_steps: int | None = None) -> None:
        self.reset()
        self.num_steps = num_steps

    def reset(self) -> None:
        self.step, self.last_timestep, self.num_steps, self.call_in_step = -1, None, None, 0
        self.step_timesteps = []
