"""The ONNX Runtime serving engine shared by edge agents and cloud workers: model sessions with
their tokenizers (:mod:`.runtime`), and the request service with priorities, micro-batching,
deadlines and de-duplication (:mod:`.service`). Needs the ``edge`` extra (onnxruntime,
tokenizers); nothing here imports torch."""
