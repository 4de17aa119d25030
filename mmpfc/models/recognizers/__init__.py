from .data_preprocessor import FaceDataPreprocessor
from .face_recognizer import FaceRecognizer

__all__ = ['FaceDataPreprocessor', 'FaceRecognizer']
