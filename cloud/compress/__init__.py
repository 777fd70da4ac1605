"""Compression: turn a large Hugging Face model into small, fast, signed ONNX artifacts per
device target (distil -> export with Optimum -> quantize -> validate -> gate -> publish).

Entry point: :func:`edgefed.cloud.compress.pipeline.compress` with a
:class:`~edgefed.cloud.compress.config.CompressConfig`; CLI ``edgefed compress``.
"""
