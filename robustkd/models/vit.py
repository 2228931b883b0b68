"""Vision Transformers for 32 x 32 images with 4 x 4 patches (AT-PRM's CIFAR-10 teachers), built with
``timm``. ImageNet weights adapted to them and the AT-PRM authors' checkpoints converted:
robustkd/checkpoints.py.

Source: Mo et al., "When Adversarial Training Meets Vision Transformers" (NeurIPS 2022), official code
mo666666/When-Adversarial-Training-Meets-Vision-Transformers @ b826030ad5c2dce94156d37ebe7f5bb3e4d67d83:
``model_for_cifar/vit.py`` (``vit_base_patch16_224``: embed 768, depth 12, 12 heads) and
``model_for_cifar/deit.py`` (``deit_small_patch16_224``: embed 384, depth 12, 6 heads), both with
qkv bias, LayerNorm eps 1e-6, a CLS token read after the final norm, ``img_size=32, patch_size=4``
(8 x 8 = 64 patch tokens + CLS). Those files are a vendored copy of timm 0.5.4; modern timm's
``VisionTransformer`` has the same parameter names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``,
``head``) and, with no LayerScale and no drop path (``ls1``/``ls2``/``drop_path1``/``drop_path2``
are identities), the same forward. Differences, all without parameters: modern timm's attention
uses ``F.scaled_dot_product_attention`` (the same maths, float rounding aside), and its
from-scratch initialisation is timm 1.x's (``init_weights_vit_timm``).

Like every model of the project, these take [0, 1] pixels and normalise inside
(:class:`robustkd.models.Classifier`); the official data loader's CIFAR-10 statistics
(``utils.py``: mean (0.4914, 0.4822, 0.4465), std (0.2471, 0.2435, 0.2616)) are the project's
``CIFAR10_MEAN``/``CIFAR10_STD``.
"""

from __future__ import annotations


import torch.nn as nn

from .registry import register_model

SOURCE = "mo666666/When-Adversarial-Training-Meets-Vision-Transformers@b826030"

# project architecture -> (timm model name, the ImageNet file the official code starts from)
VARIANTS = {
    "vit_b_4": ("vit_base_patch16_224", "jx_vit_base_p16_224-80ecf9dd.pth"),
    "deit_s_4": ("deit_small_patch16_224", "deit_small_patch16_224-cd65a155.pth"),
}


class ViT(nn.Module):
    """A timm ``VisionTransformer`` behind the project's backbone interface: ``features`` = the
    pre-logits CLS token (after the final LayerNorm), ``head`` = the linear classifier.

    ``overrides`` are timm keywords (``depth``, ``embed_dim``, ``num_heads``) for small variants of
    the same family (CPU tests); the registered architectures use none."""

    def __init__(self, timm_name: str, num_classes: int, img_size: int = 32, patch_size: int = 4,
                 **overrides):
        super().__init__()
        import timm

        self.timm_name = timm_name
        self.vit = timm.create_model(timm_name, pretrained=False, img_size=img_size, patch_size=patch_size,
                                     num_classes=num_classes, **overrides)

    def features(self, x):
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def head(self, features):
        return self.vit.head(features)

    @property
    def fc(self) -> nn.Module:
        """The classifier layer (``Classifier.feature_dim`` reads its ``in_features``)."""
        head = self.vit.head
        assert isinstance(head, nn.Module)
        return head

    def forward(self, x):
        return self.head(self.features(x))


def is_vit(arch: str) -> bool:
    return arch in VARIANTS


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (timm ``Block``: ``x + attn(norm1(x))``, then the MLP)."""
    from timm.models.vision_transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def _builder(arch: str):
    def build(num_classes, **overrides):
        return ViT(VARIANTS[arch][0], num_classes, **overrides)
    return build


# AT-PRM's CIFAR-10 teachers: ViT-B and DeiT-S at 32 x 32 with 4 x 4 patches, built with timm.
# Options (depth, embed_dim, num_heads) give small variants of the family for CPU tests.
register_model("vit_b_4", _builder("vit_b_4"))
register_model("deit_s_4", _builder("deit_s_4"))
