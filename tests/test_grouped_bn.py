import torch
import torch.nn as nn

from robustkd.grouped_bn import grouped_batchnorm


def test_grouped_batchnorm_equals_separate_forwards():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=0.3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    twin = nn.BatchNorm2d(4, momentum=0.3)
    twin.load_state_dict(bn.state_dict())
    groups = [torch.randn(5, 4, 3, 3) * (g + 1) + g for g in range(3)]
    with grouped_batchnorm(bn, 3):
        out = bn(torch.cat(groups))
    ref = torch.cat([twin(g) for g in groups])
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(bn.running_mean, twin.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, twin.running_var, atol=1e-5)
    assert bn.num_batches_tracked.item() == twin.num_batches_tracked.item() == 3
    assert "forward" not in bn.__dict__  # the class forward again after the block


def test_grouped_batchnorm_in_eval_mode_is_plain_batchnorm():
    bn = nn.BatchNorm2d(2).eval()
    x = torch.randn(6, 2, 2, 2)
    with grouped_batchnorm(bn, 3):
        assert torch.equal(bn(x), nn.BatchNorm2d(2).eval()(x))


def test_grouped_batchnorm_keeps_channels_last_in_eager_mode():
    """A channels_last input gives a channels_last output (the fast path's layout), with the same
    values and gradients as the NCHW computation: no NCHW copies on the eager paths."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=0.3)
    bn.weight.data.uniform_(0.5, 1.5)
    twin = nn.BatchNorm2d(4, momentum=0.3)
    twin.load_state_dict(bn.state_dict())
    x = torch.randn(3 * 5, 4, 6, 6)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_nchw = x.clone().requires_grad_(True)
    with grouped_batchnorm(bn, 3):
        out = bn(x_cl)
    with grouped_batchnorm(twin, 3):
        ref = twin(x_nchw)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-5)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(x_cl.grad, x_nchw.grad, atol=1e-5)
    assert torch.allclose(bn.weight.grad, twin.weight.grad, atol=1e-4)
    assert torch.allclose(bn.running_var, twin.running_var, atol=1e-6)
