from .base_margin_head import BaseMarginHead, build_margin_loss
from .center_sampler import CenterSampler
from .margin_softmax_head import MarginSoftmaxHead
from .partial_fc_head import PartialFCHead
from .sharded_head import ShardedHead

__all__ = ['BaseMarginHead', 'CenterSampler', 'MarginSoftmaxHead',
           'PartialFCHead', 'ShardedHead', 'build_margin_loss']
