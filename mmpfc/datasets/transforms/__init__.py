from .builder import build_transforms
from .lean import RandomFlipInPlace
from .loading import FlipIfRequested, LoadImageFromBytes

__all__ = ['FlipIfRequested', 'LoadImageFromBytes', 'RandomFlipInPlace',
           'build_transforms']
