"""Inference and deployment helpers."""
from .export import export_onnx, onnx_max_abs_diff
from .inference import embed_batch, extract_embeddings, init_recognizer

__all__ = ['init_recognizer', 'extract_embeddings', 'embed_batch',
           'export_onnx', 'onnx_max_abs_diff']
