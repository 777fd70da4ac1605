"""The edge agent. Imports ``edgefed.common`` only; torch and Flower only inside the optional
local-training module (``edgefed[edge-train]``)."""
