"""Backward by walking the autograd graph in Python, for virtual GPU ranks.

Why: on fake CUDA tensors (:mod:`.virtual_gpu`) the C++ autograd engine asks
the CUDA driver for the current streams before it runs a single node, and
fails on a machine without one. The graph itself needs no driver: every
node can be called from Python. :func:`run_backward` does what the engine
does for one ``backward()`` without ``create_graph``: it calls the nodes in
dependency order (highest sequence number first among the ready ones, as
the engine does on one device), sums the gradients that meet at a node
input, sums a broadcast gradient back to the input's shape and casts it to
the input's dtype (the engine's ``validate_outputs``), and accumulates into
the leaves' ``.grad``. Tensor and node hooks are not run (the training
step under test registers none outside DDP, which the virtual step does not
wrap).

Private API: ``Node._input_metadata`` and ``AccumulateGrad.variable``,
checked on torch 2.11 and 2.14. Delete this module once the autograd
engine runs on fake CUDA tensors without a driver.
"""
from __future__ import annotations

import heapq
import itertools
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ['record_function_inputs', 'run_backward', 'run_grad']


def _is_accumulate_grad(node) -> bool:
    return type(node).__name__ == 'AccumulateGrad'


def _dependencies(root) -> Dict[object, int]:
    """How many edges reach each node of the graph below ``root``."""
    counts: Dict[object, int] = {root: 0}
    stack = [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in counts:
                counts[child] = 0
                stack.append(child)
            counts[child] += 1
    return counts


def _fit_to_input(grad: torch.Tensor, node, index: int) -> torch.Tensor:
    """``grad`` summed to the shape and cast to the dtype of input
    ``index`` of ``node``, as the engine's ``validate_outputs`` does."""
    meta = node._input_metadata[index]
    shape = tuple(meta.shape)
    if tuple(grad.shape) != shape:
        grad = grad.sum_to_size(shape)
    if grad.dtype != meta.dtype:
        grad = grad.to(meta.dtype)
    return grad


def _accumulate(node, grad: torch.Tensor) -> None:
    """Add ``grad`` to the ``.grad`` of the leaf of ``node``."""
    leaf = node.variable
    grad = grad.detach()
    if grad.dtype != leaf.dtype:
        grad = grad.to(leaf.dtype)
    leaf.grad = grad if leaf.grad is None else leaf.grad + grad


def run_backward(root: torch.Tensor,
                 grad: Optional[torch.Tensor] = None) -> None:
    """Accumulate the gradient of ``root`` into the leaves it depends on
    (``root.backward(grad)``).

    Args:
        root: A tensor with a ``grad_fn`` (or a leaf requiring gradient).
        grad: Gradient of ``root``; ones for a scalar when None.
    """
    grad = _root_grad(root, grad)
    if root.grad_fn is None:
        root.grad = grad if root.grad is None else root.grad + grad
        return
    _walk(root.grad_fn, grad, _accumulate)


def run_grad(root: torch.Tensor, leaves: Sequence[torch.Tensor],
             grad: Optional[torch.Tensor] = None,
             allow_unused: bool = False) -> Tuple[Optional[torch.Tensor], ...]:
    """``torch.autograd.grad(root, leaves, grad)`` for leaf ``leaves``:
    their gradients are returned, no ``.grad`` is changed."""
    grad = _root_grad(root, grad)
    found: Dict[int, torch.Tensor] = {}

    def keep(node, value: torch.Tensor) -> None:
        key = id(node.variable)
        found[key] = value if key not in found else found[key] + value

    if root.grad_fn is not None:
        _walk(root.grad_fn, grad, keep)
    else:
        found[id(root)] = grad
    out = tuple(found.get(id(leaf)) for leaf in leaves)
    if not allow_unused and any(g is None for g in out):
        raise RuntimeError('One of the differentiated Tensors appears to not '
                           'have been used in the graph. Set '
                           'allow_unused=True if this is the desired '
                           'behavior.')
    return out


def _root_grad(root: torch.Tensor,
               grad: Optional[torch.Tensor]) -> torch.Tensor:
    if not root.requires_grad:
        raise RuntimeError('element 0 of tensors does not require grad and '
                           'does not have a grad_fn')
    if grad is not None:
        return grad
    if root.numel() != 1:
        raise RuntimeError('grad can be implicitly created only for scalar '
                           'outputs')
    return torch.ones_like(root)


def _walk(start, grad: torch.Tensor,
          at_leaf: Callable[[object, torch.Tensor], None]) -> None:
    """Call the nodes below ``start`` in the engine's order; ``at_leaf``
    receives each leaf's ``AccumulateGrad`` node and its gradient."""
    pending = _dependencies(start)
    inputs: Dict[object, List[Optional[torch.Tensor]]] = {start: [grad]}
    order = itertools.count()  # ties: first come, first served
    ready = [(-start._sequence_nr(), next(order), start)]
    while ready:
        _, _, node = heapq.heappop(ready)
        grads = inputs.pop(node, [])
        if _is_accumulate_grad(node):
            if grads and grads[0] is not None:
                at_leaf(node, grads[0])
            continue
        outputs = _call(node, grads)
        for (child, index), out in zip(node.next_functions, outputs):
            if child is None:
                continue
            if out is not None:
                out = _fit_to_input(out, child, index)
                slots = inputs.setdefault(
                    child, [None] * max(1, len(child._input_metadata)))
                slots[index] = out if slots[index] is None \
                    else slots[index] + out
            pending[child] -= 1
            if pending[child] == 0:
                heapq.heappush(ready,
                               (-child._sequence_nr(), next(order), child))


def _call(node, grads: List[Optional[torch.Tensor]]) -> tuple:
    """The gradients ``node`` returns for its inputs (None where it has
    none); a node that received no gradient at all passes None on."""
    count = max(1, len(node._input_metadata))
    grads = list(grads) + [None] * (count - len(grads))
    if all(g is None for g in grads):
        return (None, ) * len(node.next_functions)
    with torch.no_grad():
        if not hasattr(node, '_forward_cls'):  # a C++ node
            outputs = node(*grads)
        else:
            outputs = _call_python_function(node, grads)
    if not isinstance(outputs, tuple):
        outputs = (outputs, )
    return outputs


def _call_python_function(node, grads: List[Optional[torch.Tensor]]):
    """The backward of a ``torch.autograd.Function``: missing gradients as
    zeros (``materialize_grads``), and the results for non-tensor forward
    arguments dropped, as the engine's ``PyNode`` does."""
    if getattr(node, 'materialize_grads', True):
        grads = [torch.zeros(tuple(meta.shape), dtype=meta.dtype,
                             device=meta.device) if g is None else g
                 for g, meta in zip(grads, node._input_metadata)]
    outputs = node.apply(*grads)
    if not isinstance(outputs, tuple):
        outputs = (outputs, )
    flags = getattr(node, _TENSOR_INPUTS, None)
    if flags is None:
        if len(outputs) != len(node.next_functions):
            raise RuntimeError(
                f'{type(node).__name__}: cannot tell which of its '
                f'{len(outputs)} forward arguments were tensors; run the '
                'forward inside record_function_inputs()')
        return outputs
    return tuple(out for out, is_tensor in zip(outputs, flags) if is_tensor)


_TENSOR_INPUTS = '_python_backward_tensor_inputs'


@contextmanager
def record_function_inputs() -> Iterator[None]:
    """Note, on the node of every ``torch.autograd.Function`` applied
    inside, which forward arguments were tensors (the engine knows it from
    C++; :func:`run_backward` needs it to match results to edges)."""
    original = torch.autograd.Function.__dict__['apply']

    def recording(cls, *args, **kwargs):
        out = original.__get__(None, cls)(*args, **kwargs)
        flags = tuple(isinstance(a, torch.Tensor) for a in args)
        for tensor in (out if isinstance(out, (tuple, list)) else (out, )):
            node = getattr(tensor, 'grad_fn', None)
            if node is not None and hasattr(node, '_forward_cls'):
                setattr(node, _TENSOR_INPUTS, flags)
        return out

    torch.autograd.Function.apply = classmethod(recording)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original
