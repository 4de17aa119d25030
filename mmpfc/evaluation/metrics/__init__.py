from .face_verification import FaceVerificationMetric

__all__ = ['FaceVerificationMetric']
