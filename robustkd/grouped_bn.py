"""Batch norm over equal groups of one batch: G forwards' worth of statistics in one forward.

DARWIN distils on 2n+1 points per image (the clean image and both paths). Its per-point
semantics normalise each point's mini-batch with that mini-batch's own statistics, which a
straightforward implementation gets with 2n+1 small forwards. Inside :func:`grouped_batchnorm`
every BatchNorm2d in train mode treats a batch of G*B images as G consecutive groups of B and
normalises each group with its own statistics, so one large forward (convolutions batched,
better arithmetic intensity) gives the same outputs and gradients as G separate forwards, and
the running statistics are updated exactly as G sequential forwards would update them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def _grouped_forward(bn: nn.BatchNorm2d, groups: int, x: torch.Tensor) -> torch.Tensor:
    if not bn.training or groups == 1:
        return bn._robustkd_plain_forward(x)
    n, c, h, w = x.shape
    if n % groups:
        raise ValueError(f"grouped batch norm: batch of {n} does not split into {groups} equal groups")
    b = n // groups
    weight = bn.weight.repeat(groups) if bn.weight is not None else None
    bias = bn.bias.repeat(groups) if bn.bias is not None else None
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # (G*B, C, H, W) -> (B, G*C, H, W): per-(group, channel) statistics over (B, H, W) are exactly
    # what plain batch norm computes per channel, so the fused kernel does the work.
    if nhwc:   # the same regrouping on the NHWC storage: the output stays channels_last (no NCHW copies)
        xg = x.permute(0, 2, 3, 1).reshape(groups, b, h, w, c).permute(1, 2, 3, 0, 4)
        xg = xg.reshape(b, h, w, groups * c).permute(0, 3, 1, 2)
    else:
        xg = x.reshape(groups, b, c, h, w).transpose(0, 1).reshape(b, groups * c, h, w)
    y = F.batch_norm(xg, None, None, weight, bias, True, 0.0, bn.eps)
    if bn.track_running_stats and bn.running_mean is not None:
        _update_running_stats(bn, x.detach().reshape(groups, b, c, h, w), groups)
    if nhwc:
        y = y.permute(0, 2, 3, 1).reshape(b, h, w, groups, c).permute(3, 0, 1, 2, 4)
        return y.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return y.reshape(b, groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, xg: torch.Tensor, groups: int) -> None:
    """running <- (1-m) running + m stat_g for g = 1..G, in closed form."""
    if bn.momentum is None:
        raise ValueError("grouped batch norm needs a BatchNorm momentum (cumulative averaging is not supported)")
    var, mean = torch.var_mean(xg.float(), dim=(1, 3, 4), unbiased=False)          # (G, C)
    count = xg.shape[1] * xg.shape[3] * xg.shape[4]
    var = var * count / max(count - 1, 1)                                          # unbiased, as BN keeps
    m = bn.momentum
    decay = (1 - m) ** torch.arange(groups - 1, -1, -1, device=xg.device, dtype=torch.float32)  # (G,)
    keep = (1 - m) ** groups
    rm, rv = bn.running_mean, bn.running_var
    rm.copy_((keep * rm.float() + m * (decay[:, None] * mean).sum(0)).to(rm.dtype))
    rv.copy_((keep * rv.float() + m * (decay[:, None] * var).sum(0)).to(rv.dtype))
    bn.num_batches_tracked.add_(groups)


@contextlib.contextmanager
def grouped_batchnorm(model: nn.Module, groups: int):
    """Within the block, ``model``'s BatchNorm2d layers in train mode normalise each of ``groups``
    equal consecutive chunks of the batch separately (see the module docstring)."""
    plain = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    bns = [m for m in getattr(plain, "module", plain).modules() if isinstance(m, nn.BatchNorm2d)]
    own = {id(bn): "forward" in bn.__dict__ for bn in bns}
    for bn in bns:
        bn._robustkd_plain_forward = bn.forward
        bn.forward = lambda x, bn=bn: _grouped_forward(bn, groups, x)
    try:
        yield model
    finally:
        for bn in bns:
            if own[id(bn)]:
                bn.forward = bn._robustkd_plain_forward
            else:
                del bn.forward  # back to the class's forward
            del bn._robustkd_plain_forward
