"""Knowing which step of a denoising loop a denoiser call belongs to."""
from __future__ import annotations

from dataclasses import dataclass


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

    def observe(self, timestep: float | None) -> bool:
        """Records a call; returns True when it starts a new loop."""
        starts_loop = (self.step < 0 or timestep is None or self.last_timestep is None
                       or timestep > self.last_timestep)
        if starts_loop:
            announced = self.step < 0 and self.num_steps is not None
            self.step, self.call_in_step = 0, 0
            if not announced:
                self.num_steps = None
        elif timestep < self.last_timestep:
            self.step += 1
            self.call_in_step = 0
        else:
            self.call_in_step += 1
        self.last_timestep = timestep
        return starts_loop

    def begin_loop(self, num_steps: int | None = None) -> None:
        self.reset()
        self.num_steps = num_steps

    def reset(self) -> None:
        self.step, self.last_timestep, self.num_steps, self.call_in_step = -1, None, None, 0
