"""Grad-CAM attention maps (Selvaraju et al., ICCV 2017) of the project's models on [0, 1] images.

Two backends that compute the same map:

- ``grad-cam``: the ``grad-cam`` package (jacobgil/pytorch-grad-cam, import ``pytorch_grad_cam``),
  ``GradCAM(model, target_layers=[layer])`` with ``ClassifierOutputTarget(class)``, when installed
  (an optional extra: it pulls OpenCV);
- ``builtin``: the same computation in torch, statement for statement as that package
  (jacobgil/pytorch-grad-cam: ``grad_cam.py`` @ 6f0f161 - channel weights = the gradient's spatial
  mean; ``base_cam.py`` @ 3e9c330 - ReLU of the weighted sum of activations, per image min-max
  scaled, resized to the input, the layers' mean scaled again; ``utils/image.py`` @ 4f0a668 -
  ``scale_cam_image``: ``(c - min) / (1e-7 + max)``). The resize is bilinear with half-pixel
  centres, as OpenCV's ``cv2.resize`` default.

The layer is a setting per architecture (a module path of :class:`robustkd.models.Classifier`);
:data:`DEFAULT_LAYERS` gives the last convolutional stage of each family. For the ViTs the layer is
the last block's ``norm1`` (pytorch-grad-cam's ViT example, ``usage_examples/vit_example.py``):
its (N, 1 + H*W, D) tokens become an (N, D, H, W) map, the CLS token dropped
(:func:`tokens_to_grid`, the example's ``reshape_transform``; passed to the package too).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

# architecture prefix -> module path of the layer whose activations are mapped
DEFAULT_LAYERS = {
    "resnet": "backbone.layers",        # output of the last residual block (4 x 4 for CIFAR ResNets)
    "mobilenetv2": "backbone.layers",   # output of the last inverted-residual block (4 x 4)
    "wrn": "backbone.blocks",           # output of the last wide block (8 x 8)
    "vit_": "backbone.vit.blocks.-1.norm1",    # last block's first LayerNorm: 8 x 8 patch tokens
    "deit_": "backbone.vit.blocks.-1.norm1",
}


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(N, prefix + H*W, D) transformer tokens -> (N, D, H, W), the prefix (CLS) tokens dropped;
    4-d activations pass unchanged."""
    if tokens.dim() != 3:
        return tokens
    n, t, d = tokens.shape
    side = math.isqrt(t - 1)
    grid = tokens[:, t - side * side:]
    return grid.reshape(n, side, side, d).permute(0, 3, 1, 2)


def layer_for(arch: str, overrides: dict | None = None) -> str:
    """The module path for ``arch``: ``overrides[arch]`` when given, else the family default."""
    if overrides and arch in overrides:
        return overrides[arch]
    for prefix, path in DEFAULT_LAYERS.items():
        if arch.startswith(prefix):
            return path
    raise InputError(f"no Grad-CAM layer known for architecture {arch!r}; name one in attention.layers "
                     f"(a module path such as 'backbone.layers')")


def find_layer(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``; a negative integer part indexes a sequence from its end
    (``blocks.-1``: the last block, whatever the depth)."""
    try:
        module = model
        for part in path.split("."):
            if part.lstrip("-").isdigit() and int(part) < 0:
                module = list(module.children())[int(part)]
            else:
                module = module.get_submodule(part)
        return module
    except (AttributeError, IndexError):
        names = [n for n, _ in model.named_modules() if n and n.count(".") <= 2]
        raise InputError(f"Grad-CAM layer {path!r} is not a module of {type(model).__name__}; "
                         f"modules include {names[:20]}") from None


def _scale(cam: torch.Tensor) -> torch.Tensor:
    """Per image: ``(c - min) / (1e-7 + max)`` (pytorch-grad-cam's ``scale_cam_image``)."""
    flat = cam.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    flat = flat / (1e-7 + flat.max(1, keepdim=True).values)
    return flat.view_as(cam)


def grad_cam_builtin(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] for the logits ``targets`` (class indices), model in eval mode."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            score = logits.gather(1, targets.view(-1, 1).to(logits.device)).sum()
            grad, = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
        model.train(was_training)
    acts = tokens_to_grid(store["a"].detach())
    grad = tokens_to_grid(grad)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = (weights * acts).sum(1).clamp_min(0)
    cam = F.interpolate(_scale(cam)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _scale(cam.clamp_min(0))


def grad_cam_package(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same maps from the ``grad-cam`` package (ImportError when it is not installed)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    try:
        with GradCAM(model=model, target_layers=[layer], reshape_transform=_transform_for(layer)) as cam:
            maps = cam(input_tensor=x.detach(), targets=[ClassifierOutputTarget(int(c)) for c in targets])
    finally:
        model.train(was_training)
    return torch.as_tensor(maps)


def _transform_for(layer: nn.Module):
    """The package's ``reshape_transform``: tokens to a grid for transformer layers (LayerNorm)."""
    return tokens_to_grid if isinstance(layer, nn.LayerNorm) else None


def available_backend(backend: str = "auto") -> str:
    if backend not in ("auto", "grad-cam", "builtin"):
        raise InputError(f"Grad-CAM backend {backend!r}; expected auto, grad-cam or builtin")
    if backend == "builtin":
        return backend
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        if backend == "grad-cam":
            raise InputError("attention.backend is grad-cam but the grad-cam package is not installed "
                             "(pip install grad-cam, or the project's 'attention' extra)") from None
        return "builtin"
    return "grad-cam"


def grad_cam(model: nn.Module, layer_path: str, x: torch.Tensor, targets: torch.Tensor,
             backend: str = "auto") -> tuple[torch.Tensor, str]:
    """(maps (N, H, W) in [0, 1], the backend used) for ``model``'s layer ``layer_path``."""
    layer = find_layer(model, layer_path)
    chosen = available_backend(backend)
    fn = grad_cam_package if chosen == "grad-cam" else grad_cam_builtin
    return fn(model, layer, x, targets).float().cpu(), chosen
