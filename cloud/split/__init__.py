"""Split planning: cut a model into a head (on the device) and a tail (in the cloud).

:mod:`.partition` exports head and tail ONNX graphs for a split point; :mod:`.partition_generate`
runs greedy generation over a split decoder; :mod:`.partition_sign` turns a pair into signed
artifacts. (Profiling and planning live in :mod:`.profile`, :mod:`.plan` and :mod:`.replan`;
:mod:`.publish` registers pairs and profiles for the controller, whose :mod:`.placements`
service re-plans each agent's placement from its measured link.)
"""

from edgefed.cloud.split.errors import (
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
from edgefed.cloud.split.partition_generate import SplitGeneration, SplitSide, split_generate
from edgefed.cloud.split.partition_sign import SplitArtifacts, sign_split, split_artifact_name

__all__ = [
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
    "candidate_points",
    "export_split",
    "inspect_model",
    "sign_split",
    "split_artifact_name",
    "split_generate",
]
