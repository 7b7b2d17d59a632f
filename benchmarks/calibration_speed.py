"""How long collecting a calibration set takes: 8 conditions x 50 steps on the default UNet.
usage: python benchmarks/calibration_speed.py OUT.json"""
import json
import platform
import sys
import tempfile
import time

import torch

import diffc.models as dm
from diffc.calibration import collect

pipe = dm.load("digits-unet")
pipe.set_progress_bar_config(disable=True)
with tempfile.TemporaryDirectory() as folder:
    started = time.perf_counter()
    cal = collect(pipe, conditions=list(range(8)), num_steps=50, out=folder + "/set", progress=False)
    seconds = time.perf_counter() - started
result = {"what": "collect(digits-unet, 8 conditions x 50 steps, timesteps=all)", "seconds": round(seconds, 1),
          "records": len(cal), "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
          "cpu_threads": torch.get_num_threads()}
print(json.dumps(result))
with open(sys.argv[1], "w") as fh:
    json.dump(result, fh, indent=1)
