from .center_sampler import CenterSampler
from .partial_fc_head import PartialFCHead

__all__ = ['CenterSampler', 'PartialFCHead']
