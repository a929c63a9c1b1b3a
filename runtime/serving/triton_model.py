"""What Triton's Python backend runs: the repository's model.py calls `model_for`, which picks
the model a config's `role` parameter names. Everything imported here runs inside Triton's stub;
nothing here writes repositories (that is runtime.serving.repository and .ensemble).
"""

from __future__ import annotations

import json

from runtime.serving.ensemble_steps import ROLES
from runtime.serving.pipeline_model import Blip2Model, parameters
from runtime.serving.streaming import StreamModel


def model_for(args: dict, pb_utils):
    """The model a repository's model.py runs: the whole pipeline, its streaming twin, or
    (`role` parameter) one Python step of the GPU ensemble (runtime.serving.ensemble)."""
    role = parameters(json.loads(args["model_config"])).get("role") or "pipeline"
    if role == "pipeline":
        return Blip2Model(args, pb_utils)
    if role == "stream":
        return StreamModel(args, pb_utils)
    return ROLES[role](args, pb_utils)
