from .center_sampler import CenterSampler
from .margin_softmax_head import MarginSoftmaxHead
from .partial_fc_head import PartialFCHead

__all__ = ['CenterSampler', 'MarginSoftmaxHead', 'PartialFCHead']
