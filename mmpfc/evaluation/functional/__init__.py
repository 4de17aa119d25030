from .ijb import (align_face, pair_scores, read_ijb_meta, roc_curve,
                  similarity_transform, tar_at_far, template_features)
from .verification import DEFAULT_THRESHOLDS, evaluate_pairs, l2_normalize

__all__ = [
    'DEFAULT_THRESHOLDS', 'align_face', 'evaluate_pairs', 'l2_normalize',
    'pair_scores', 'read_ijb_meta', 'roc_curve', 'similarity_transform',
    'tar_at_far', 'template_features'
]
