"""Hand-computation helpers shared by the method tests."""

import math

import torch

from ..conftest import FixedLinear


def kl(p, q, log_eps=0.0):
    """KL(p || q); ``log_eps`` inside the first log as RSLAD's official kl_loss."""
    return sum(pi * (math.log(pi + log_eps) - math.log(qi)) for pi, qi in zip(p, q))


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def linear_pair(seed=0, dim=3 * 32 * 32, classes=4):
    g = torch.Generator().manual_seed(seed)
    student = FixedLinear(torch.randn(classes, dim, generator=g) * 0.01, torch.randn(classes, generator=g))
    teacher = FixedLinear(torch.randn(classes, dim, generator=g) * 0.01, torch.randn(classes, generator=g))
    return student, teacher
