"""edgefed: cloud-edge federation for transformer models.

The sub-packages live at the top of the repository and are linked here:
``edgefed.common`` (wire schemas, MQTT, artifacts, settings), ``edgefed.edge`` (the agent),
``edgefed.cloud`` (the controller) and ``edgefed.simulation`` (the harness).
"""

__version__ = "0.1.0"
