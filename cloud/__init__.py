"""The cloud controller: control API, registry, compression, split planning, routing,
federation and orchestration. Imports ``edgefed.common`` only."""
