"""Light pieces of federated learning (pure Python + numpy): local data sets and their errors."""
