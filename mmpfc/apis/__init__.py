"""Inference and deployment helpers."""
from .export import export_onnx, onnx_max_abs_diff
from .inference import extract_embeddings, init_recognizer

__all__ = ['init_recognizer', 'extract_embeddings', 'export_onnx',
           'onnx_max_abs_diff']
