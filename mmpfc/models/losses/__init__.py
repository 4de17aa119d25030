from .adaface_loss import AdaFaceLoss
from .base_margin import BaseMargin, MarginBatch
from .combined_margin_loss import CombinedMarginLoss
from .curricular_face_loss import CurricularFaceLoss
from .elastic_face_loss import ElasticFaceLoss
from .magface_loss import MagFaceLoss

__all__ = ['AdaFaceLoss', 'BaseMargin', 'CombinedMarginLoss',
           'CurricularFaceLoss', 'ElasticFaceLoss', 'MagFaceLoss',
           'MarginBatch']
