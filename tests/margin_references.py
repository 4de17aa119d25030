"""Pieces shared by the margin tests: the dense float64 CurricularFace
formula (written from the paper and the official code, not from mmpfc)
and one step of a head with its gradients."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


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
