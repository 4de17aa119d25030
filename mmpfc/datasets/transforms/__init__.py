from .builder import build_transforms
from .loading import FlipIfRequested, LoadImageFromBytes

__all__ = ['FlipIfRequested', 'LoadImageFromBytes', 'build_transforms']
