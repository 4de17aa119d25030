"""The Python walk of the autograd graph gives what torch's engine gives.

Every case runs the same computation twice on CPU tensors, once with
``Tensor.backward`` / ``torch.autograd.grad`` (the C++ engine) and once
with :mod:`mmpfc.testing.python_backward`, and compares the gradients.
"""
import pytest
import torch

from mmpfc.testing.python_backward import (record_function_inputs,
                                           run_backward, run_grad)


class ScaleBy(torch.autograd.Function):
    """A custom function with a non-tensor argument between two tensors."""

    @staticmethod
    def forward(ctx, x, factor, y):
        ctx.factor = factor
        ctx.save_for_backward(x, y)
        return x * factor + y * y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return grad * ctx.factor, None, 2 * grad * y


def leaves(seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    other = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    inputs = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (weight, bias, other)], inputs


def graph(params, inputs):
    """Broadcasting (bias), a leaf used twice (weight), a custom function,
    a float32 branch cast back (dtype change inside the graph)."""
    weight, bias, other = params
    hidden = torch.tanh(inputs @ weight.t() + bias)  # bias broadcast
    mixed = ScaleBy.apply(hidden, 3.0, other)
    cast = (weight.float() * 2).double().sum()
    return (mixed * hidden).sum() + cast + (weight ** 2).sum()


def test_backward_matches_the_engine():
    params, inputs = leaves(0)
    graph(params, inputs).backward()
    expected = [p.grad.clone() for p in params]
    params, inputs = leaves(0)
    with record_function_inputs():
        loss = graph(params, inputs)
    run_backward(loss)
    for got, want in zip((p.grad for p in params), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_backward_accumulates_into_existing_grads():
    params, inputs = leaves(1)
    graph(params, inputs).backward()
    graph(params, inputs).backward()
    expected = [p.grad.clone() for p in params]
    params, inputs = leaves(1)
    with record_function_inputs():
        first, second = graph(params, inputs), graph(params, inputs)
    run_backward(first)
    run_backward(second)
    for got, want in zip((p.grad for p in params), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_grad_matches_autograd_grad_and_leaves_grad_alone():
    params, inputs = leaves(2)
    want = torch.autograd.grad(graph(params, inputs), params[:2])
    params, inputs = leaves(2)
    with record_function_inputs():
        loss = graph(params, inputs)
    got = run_grad(loss, params[:2])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in params)


def test_grad_of_an_unused_leaf():
    params, inputs = leaves(3)
    unused = torch.zeros(2, requires_grad=True)
    with record_function_inputs():
        loss = graph(params, inputs)
    with pytest.raises(RuntimeError, match='allow_unused'):
        run_grad(loss, [params[0], unused])
    assert run_grad(loss, [params[0], unused], allow_unused=True)[1] is None


def test_non_scalar_root_needs_a_gradient():
    params, inputs = leaves(4)
    out = inputs @ params[0].t()
    with pytest.raises(RuntimeError, match='scalar outputs'):
        run_backward(out)
    grad = torch.ones_like(out) * 0.5
    run_backward(out, grad)
    torch.testing.assert_close(params[0].grad, grad.t() @ inputs)


def test_recording_is_undone():
    apply = torch.autograd.Function.apply
    with record_function_inputs():
        assert torch.autograd.Function.apply is not apply
    assert torch.autograd.Function.apply == apply
