"""Pieces shared by the margin tests: the margins' settings, the dense
float64 references written from the papers' formulas and the official code
(never calling mmpfc), and one step of a head with its gradients."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F


def curricular_face(cos: torch.Tensor, cos_t: torch.Tensor,
                    t_prev: torch.Tensor, m: float, t_alpha: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CurricularFace on dense (N, C) cosines and their (N,) targets:
    ``(target logits, every logit as a non-target, new t)``, unscaled.

    t <- t_alpha mean(cos_t) + (1 - t_alpha) t (before use, no gradient);
    target cos(theta + m) where cos_t > cos(pi - m), else
    cos_t - m sin(pi - m); a non-target above the row's cos(theta + m)
    becomes cos (t + cos).
    """
    theta = torch.acos(cos_t)
    t = t_alpha * cos_t.detach().mean() + (1 - t_alpha) * t_prev
    target = torch.where(cos_t > math.cos(math.pi - m),
                         torch.cos(theta + m),
                         cos_t - m * math.sin(math.pi - m))
    hard = cos > torch.cos(theta + m).detach()[:, None]
    return target, torch.where(hard, cos * (t + cos), cos), t


def head_step(head, emb: torch.Tensor, labels: torch.Tensor, mine: slice
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                         torch.Tensor]:
    """One forward and backward of ``head`` on this rank's rows ``mine``
    of the global batch: ``(loss, feature gradient, used rows or None,
    their center gradient)``; the weight is not updated."""
    feats = emb[mine].clone().requires_grad_(True)
    head.weight.grad = None
    loss = head.loss_by_labels(feats, labels[mine])
    loss.backward()
    popped = head.pop_sampled_gradient()
    index, wgrad = (None, head.weight.grad) if popped is None else popped
    return loss, feats.grad, index, wgrad


NUM_CLASSES, DIM, BATCH, STEPS = 23, 8, 4, 3
MARGINS = {
    'curricular': dict(type='CurricularFaceLoss', s=32.0, m=0.5,
                       t_alpha=0.3),
    'adaface': dict(type='AdaFaceLoss', s=32.0, m=0.4, h=0.333, t_alpha=0.3),
    'magface': dict(type='MagFaceLoss', s=32.0, l_a=10.0, u_a=110.0,
                    l_m=0.45, u_m=0.8, lambda_g=35.0),
    'magface_hard': dict(type='MagFaceLoss', s=32.0, l_a=10.0, u_a=110.0,
                         l_m=0.45, u_m=0.8, lambda_g=35.0,
                         easy_margin=False),
    'elastic_arc': dict(type='ElasticFaceLoss', s=32.0, m=0.5, std=0.05,
                        kind='arc', seed=7),
    'elastic_cos_plus': dict(type='ElasticFaceLoss', s=32.0, m=0.35,
                             std=0.05, kind='cos', plus=True, seed=8),
}
#: running statistics, as the papers start them
START = {'curricular': dict(t=0.0), 'adaface': dict(mean=20.0, std=100.0)}


def batch(step, rows, seed=0):
    """Embeddings with norms spread over [3, 130] (both sides of MagFace's
    [10, 110] and AdaFace's statistics) and their labels."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    emb = F.normalize(torch.randn(rows, DIM, generator=gen,
                                  dtype=torch.float64), dim=1)
    norms = 3.0 + 127.0 * torch.rand(rows, 1, generator=gen,
                                     dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (rows, ), generator=gen)
    return emb * norms, labels


# ------------------------------------------------------------ the reference
def reference(name, cfg, weight, emb, labels, state, margins=None):
    """Loss, d loss / d emb, d loss / d weight and the new running state of
    one step, float64, dense over all C columns of ``weight``."""
    w = weight.detach().double().clone().requires_grad_(True)
    e = emb.detach().double().clone().requires_grad_(True)
    cos = (F.normalize(e, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1, 1)
    onehot = F.one_hot(labels, w.shape[0]).bool()
    s, extra, other, state = cfg['s'], 0.0, None, dict(state)
    if name == 'adaface':
        eps = 1e-3
        cos = cos.clamp(-1 + eps, 1 - eps)
    cos_t = cos[onehot]
    theta = torch.acos(cos_t)
    if name == 'curricular':
        target, other, state['t'] = curricular_face(
            cos, cos_t, state['t'], cfg['m'], cfg['t_alpha'])
    elif name == 'adaface':
        m, h, alpha = cfg['m'], cfg['h'], cfg['t_alpha']
        safe = e.detach().norm(dim=1).clip(0.001, 100)
        mean = alpha * safe.mean() + (1 - alpha) * state['mean']
        std = alpha * safe.std() + (1 - alpha) * state['std']
        state.update(mean=mean, std=std)
        g = (h * (safe - mean) / (std + eps)).clip(-1, 1)
        angle = (theta - m * g).clip(eps, math.pi - eps)
        target = torch.cos(angle) - (m + m * g)
    elif name.startswith('magface'):
        a = e.norm(dim=1).clamp(cfg['l_a'], cfg['u_a'])
        m = ((cfg['u_m'] - cfg['l_m']) * (a - cfg['l_a'])
             / (cfg['u_a'] - cfg['l_a']) + cfg['l_m'])
        arc = torch.cos(theta + m)
        if cfg.get('easy_margin', True):
            target = torch.where(cos_t > 0, arc, cos_t)
        else:
            target = torch.where(cos_t > torch.cos(math.pi - m), arc,
                                 cos_t - m * torch.sin(math.pi - m))
        extra = cfg['lambda_g'] * (1 / a + a / cfg['u_a']**2).mean()
    elif name.startswith('elastic'):
        if cfg['kind'] == 'arc':
            target = torch.cos(theta + margins)
        else:
            target = cos_t - margins
    if other is None:
        other = cos
    logits = torch.where(onehot, target[:, None], other) * s
    loss = F.cross_entropy(logits, labels) + extra
    loss.backward()
    return loss.detach(), e.grad, w.grad, state


def state_of(name, margin):
    """The margin's running statistics as floats (for the reference)."""
    if name == 'curricular':
        return dict(t=margin.t.item())
    if name == 'adaface':
        return dict(mean=margin.batch_mean.item(),
                    std=margin.batch_std.item())
    return {}


def check_state(name, margin, state):
    if name == 'curricular':
        assert margin.t.item() == pytest.approx(float(state['t']),
                                                rel=1e-12, abs=1e-15)
    if name == 'adaface':
        assert margin.batch_mean.item() == pytest.approx(
            float(state['mean']), rel=1e-12)
        assert margin.batch_std.item() == pytest.approx(
            float(state['std']), rel=1e-12)


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(
        1e-300)).item()
