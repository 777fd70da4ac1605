"""The agent's optional local-training module (``edgefed[edge-train]``): the Flower ClientApp
and the SuperNode supervisor. Nothing else in the agent imports it eagerly."""
