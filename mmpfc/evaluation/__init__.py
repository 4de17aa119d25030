from .functional import evaluate_pairs, l2_normalize
from .metrics import FaceVerificationMetric

__all__ = ['FaceVerificationMetric', 'evaluate_pairs', 'l2_normalize']
