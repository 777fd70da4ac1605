"""Split planning: cut a model into a head (on the device) and a tail (in the cloud).

:mod:`.partition` exports head and tail ONNX graphs for a split point; :mod:`.partition_generate`
runs greedy generation over a split decoder (and, as a baseline, over a whole one);
:mod:`.partition_sign` turns a pair into signed artifacts; :mod:`.smollm2` makes the real
SmolLM2-135M a model directory. (Profiling and planning live in :mod:`.profile`, :mod:`.plan`
and :mod:`.replan`; :mod:`.publish` registers pairs and profiles for the controller, whose
:mod:`.placements` service re-plans each agent's placement from its measured link.)
"""

from edgefed.cloud.split.errors import (
    ModelNotInstalledError,
    NotAModelError,
    SplitError,
    SplitExportError,
    SplitPointError,
    SplitRunError,
    SplitSigningError,
    UnsupportedModelError,
)
from edgefed.cloud.split.partition import (
    ModelShape,
    SplitPair,
    candidate_points,
    export_split,
    inspect_model,
)
from edgefed.cloud.split.partition_generate import (
    SplitGeneration,
    SplitSide,
    cached_generate,
    split_generate,
)
from edgefed.cloud.split.partition_sign import SplitArtifacts, sign_split, split_artifact_name

__all__ = [
    "ModelNotInstalledError",
    "ModelShape",
    "NotAModelError",
    "SplitArtifacts",
    "SplitError",
    "SplitExportError",
    "SplitGeneration",
    "SplitPair",
    "SplitPointError",
    "SplitRunError",
    "SplitSide",
    "SplitSigningError",
    "UnsupportedModelError",
    "cached_generate",
    "candidate_points",
    "export_split",
    "inspect_model",
    "sign_split",
    "split_artifact_name",
    "split_generate",
]
