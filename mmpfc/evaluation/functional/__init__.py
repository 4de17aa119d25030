from .verification import DEFAULT_THRESHOLDS, evaluate_pairs, l2_normalize

__all__ = ['DEFAULT_THRESHOLDS', 'evaluate_pairs', 'l2_normalize']
