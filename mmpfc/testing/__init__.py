"""Test and simulation helpers that ship with the package (the fit check
uses them too): virtual GPU ranks."""
from .virtual_gpu import (Collective, HostRead, Kernel, VirtualGPU, Work,
                          virtual_rank)

__all__ = ['Collective', 'HostRead', 'Kernel', 'VirtualGPU', 'Work',
           'virtual_rank']
