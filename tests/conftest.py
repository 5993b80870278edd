import os

import torch
from hypothesis import settings

torch.manual_seed(0)

# CI replays the same examples every run, so that a landing never depends on luck;
# developers' runs keep exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
