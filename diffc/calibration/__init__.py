"""Timestep-aware calibration: record what the denoiser sees along real sampling trajectories,
compute per-node statistics per timestep group, and evaluate candidate graphs on the data."""
from .collect import Recording, as_calibration_set, collect, record
from .draws import FRESH_DRAWS, draw_error, fresh_draws
from .evaluate import (ResampledReference, StepErrors, node_error, output_error, propagation_weights, relative_error,
                       resampling, split_items, trajectory_error)
from .loop import SamplingLoop, StepMap, guidance_rows, identify_loop, sampling_loop
from .replay import guidance_loss, loop_error, merged_error, population_psnr, replay_loop
from .statistics import NodeStats, Statistics, compute_statistics, nodes_of_interest
from .store import CalibrationError, CalibrationSet, Record, call_arguments
from .timesteps import STRATEGIES, select_steps, step_group

__all__ = [
    "call_arguments",
    "collect", "record", "Recording", "as_calibration_set", "CalibrationSet", "CalibrationError", "Record",
    "compute_statistics", "Statistics", "NodeStats", "nodes_of_interest", "output_error", "relative_error",
    "node_error", "trajectory_error", "propagation_weights", "StepErrors", "select_steps", "step_group", "STRATEGIES",
    "resampling", "split_items", "SamplingLoop", "StepMap", "identify_loop", "sampling_loop", "replay_loop", "loop_error", "population_psnr",
    "guidance_loss", "merged_error", "draw_error", "fresh_draws", "FRESH_DRAWS",
    "guidance_rows", "ResampledReference",
]
