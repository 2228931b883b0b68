"""The ViT teachers (robustkd/models/vit.py): the registered architectures, ImageNet weight adaptation, the
AT-PRM checkpoint converter against a transcription of the official model, Grad-CAM on tokens."""

import pytest
import torch
import torch.nn.functional as F

from robustkd.errors import InputError
from robustkd.checkpoints import (adapt_imagenet_state, convert_atprm_checkpoint, is_atprm_checkpoint,
                                  load_checkpoint, load_imagenet_weights, resize_pos_embed, save_checkpoint,
                                  sum_pool_patch_kernel)
from robustkd.models import CIFAR10_MEAN, CIFAR10_STD, create_model

from .official_vit import VisionTransformer, randomise

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}   # a small member of the family: fast on a CPU


def test_official_loader_statistics_are_the_projects():
    # AT-PRM's utils.py: cifar10_mean (0.4914, 0.4822, 0.4465), cifar10_std (0.2471, 0.2435, 0.2616)
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2471, 0.2435, 0.2616)


@pytest.mark.parametrize("arch,params,dim", [("vit_b_4", 85_152_010, 768), ("deit_s_4", 21_342_346, 384)])
def test_registered_vits_have_the_official_sizes_and_the_classifier_interface(arch, params, dim):
    model = create_model(arch).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.feature_dim == dim
    vit = model.backbone.vit
    assert vit.patch_embed.proj.kernel_size == (4, 4) and tuple(vit.pos_embed.shape) == (1, 65, dim)
    assert vit.blocks[0].norm1.eps == 1e-6 and vit.blocks[0].attn.qkv.bias is not None
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        assert torch.allclose(model.features(x), feats) and torch.allclose(model.backbone.head(feats), logits)
        # the normalisation is inside: the backbone sees (x - mean) / std
        assert torch.allclose(vit((x - model.normalize.mean) / model.normalize.std), logits, atol=1e-5)
    assert logits.shape == (2, 10) and feats.shape == (2, dim)


def test_a_vit_checkpoint_round_trips(tmp_path):
    model = create_model("deit_s_4", **TINY).eval()
    save_checkpoint(model, tmp_path / "m.pt")
    back = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


def _official_checkpoint(path, seed=0, **kw):
    """A file exactly as train_cifar.py saves it: nn.DataParallel state dict, epoch, optimiser."""
    official = randomise(VisionTransformer(**kw), seed).eval()
    wrapped = torch.nn.DataParallel(official)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.save({"state_dict": wrapped.state_dict(), "epoch": 40, "opt": opt.state_dict()}, path)
    return official


def _max_logit_diff(official, model):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return (official((x - mean) / std) - model(x)).abs().max().item()   # loader normalisation vs inside


def test_atprm_checkpoint_converts_to_the_same_logits_tiny(tmp_path):
    path = tmp_path / "checkpoint_40"
    official = _official_checkpoint(path, embed_dim=48, depth=2, num_heads=3)
    assert is_atprm_checkpoint(path)
    model = convert_atprm_checkpoint(path, "vit_b_4", **TINY)
    assert _max_logit_diff(official, model) < 1e-5


@pytest.mark.slow   # two ViT-B/4 models built: 12-20 s on a busy 2-core CPU
def test_atprm_vit_b_checkpoint_converts_to_the_same_logits(tmp_path):
    """The full ViT-B/4 (the DataParallel keys, 12 blocks): max |logit difference| < 1e-5 with timm's
    explicit attention (the official maths, op for op: measured 0.0); timm's default fused attention
    (F.scaled_dot_product_attention) rounds differently: within 1e-5 of the logits' scale."""
    path = tmp_path / "checkpoint_40"
    official = _official_checkpoint(path)
    model = convert_atprm_checkpoint(path)   # the architecture read from the embedding width
    assert model.arch == "vit_b_4" and model.options["mean"] == list(CIFAR10_MEAN)
    fused = _max_logit_diff(official, model)
    for block in model.backbone.vit.blocks:
        block.attn.fused_attn = False
    explicit = _max_logit_diff(official, model)
    print(f"AT-PRM converter, ViT-B/4: max |logit difference| {explicit:.2e} (explicit attention), "
          f"{fused:.2e} (fused attention)")
    assert explicit < 1e-5
    with torch.no_grad():
        scale = model(torch.rand(4, 3, 32, 32)).abs().max().item()
    assert fused < 1e-5 * max(scale, 1.0)


def test_atprm_converter_is_strict(tmp_path):
    official = randomise(VisionTransformer(embed_dim=48, depth=2, num_heads=3))
    state = {f"module.{k}": v for k, v in official.state_dict().items()}
    extra = dict(state, **{"module.dist_token": torch.zeros(1, 1, 48)})
    torch.save({"state_dict": extra, "epoch": 1, "opt": {}}, tmp_path / "extra")
    with pytest.raises(InputError, match="unexpected keys \\['dist_token'\\]"):
        convert_atprm_checkpoint(tmp_path / "extra", "vit_b_4", **TINY)
    short = {k: v for k, v in state.items() if "blocks.1.mlp" not in k}
    torch.save({"state_dict": short, "epoch": 1, "opt": {}}, tmp_path / "short")
    with pytest.raises(InputError, match="missing keys .*blocks.1.mlp.fc1.bias"):
        convert_atprm_checkpoint(tmp_path / "short", "vit_b_4", **TINY)
    torch.save({"state_dict": state, "epoch": 1, "opt": {}}, tmp_path / "good")
    with pytest.raises(InputError, match="shapes differ"):   # a wider model for the same keys
        convert_atprm_checkpoint(tmp_path / "good", "vit_b_4", **{**TINY, "embed_dim": 60})
    with pytest.raises(InputError, match="ViT-B/DeiT-S"):
        convert_atprm_checkpoint(tmp_path / "good", "resnet18")


def test_patch_kernel_is_sum_pooled_as_the_official_line():
    w = torch.randn(5, 3, 16, 16)
    pooled = sum_pool_patch_kernel(w, 4)
    # official: v.reshape(*v.shape[:2], patch, v.shape[2]//patch, patch, v.shape[3]//patch).sum(dim=[3,5])
    assert torch.equal(pooled, w.reshape(5, 3, 4, 4, 4, 4).sum(dim=[3, 5]))
    assert torch.allclose(pooled, F.avg_pool2d(w, 4) * 16, atol=1e-5)   # 4 x 4 blocks summed
    # a constant image: the pooled 4x4 conv on a 4x4 patch gives the 16x16 conv's response on a 16x16 patch
    assert torch.allclose(pooled.sum(dim=(2, 3)), w.sum(dim=(2, 3)), atol=1e-5)


def test_position_embedding_is_resized_bilinearly_with_the_cls_token_kept():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = resize_pos_embed(pe, 8)
    assert out.shape == (1, 65, 8) and torch.equal(out[:, 0], pe[:, 0])
    grid = pe[0, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(8, 8), mode="bilinear").permute(0, 2, 3, 1).reshape(1, 64, 8)
    assert torch.allclose(out[:, 1:], want)


def _imagenet_state(dim=48, depth=2, heads=3, classes=1000):
    import timm

    src = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=dim, depth=depth,
                            num_heads=heads, num_classes=classes)
    return src.state_dict()


def test_imagenet_weights_are_adapted_and_recorded(tmp_path):
    state = _imagenet_state()
    path = tmp_path / "in1k.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_model("vit_b_4", **TINY)
    head = model.backbone.vit.head.weight.clone()
    info = load_imagenet_weights(model, path)
    vit = model.backbone.vit
    assert "ImageNet" in info["init"] and info["pretrained"] == str(path) and info["pretrained_hash"]
    assert torch.equal(vit.patch_embed.proj.weight, sum_pool_patch_kernel(state["patch_embed.proj.weight"], 4))
    assert torch.equal(vit.pos_embed, resize_pos_embed(state["pos_embed"], 8))
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert torch.equal(vit.head.weight, head)    # the 1000-class head dropped, the fresh head kept


def test_imagenet_weights_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = _imagenet_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    model = create_model("vit_b_4", **TINY)
    load_imagenet_weights(model, tmp_path / "model.safetensors")
    assert torch.equal(model.backbone.vit.cls_token, state["cls_token"])


def test_imagenet_adaptation_is_strict(tmp_path):
    model = create_model("vit_b_4", **TINY)
    state = _imagenet_state()
    with pytest.raises(InputError, match="unexpected keys \\['dist_token'\\]"):
        adapt_imagenet_state({**state, "dist_token": torch.zeros(1, 1, 48)}, model.backbone.vit, "f", "vit_b_4")
    with pytest.raises(InputError, match="missing keys \\['norm.bias'\\]"):
        adapt_imagenet_state({k: v for k, v in state.items() if k != "norm.bias"}, model.backbone.vit, "f",
                             "vit_b_4")
    with pytest.raises(InputError, match="ViT teachers"):
        torch.save(state, tmp_path / "w.pth")
        load_imagenet_weights(create_model("resnet10_w8"), tmp_path / "w.pth")


def test_grad_cam_of_a_vit_maps_the_patch_grid():
    from robustkd.attention import grad_cam, layer_for

    model = create_model("deit_s_4", **TINY).eval()
    path = layer_for(model.arch)
    assert path == "backbone.vit.blocks.-1.norm1"
    maps, backend = grad_cam(model, path, torch.rand(2, 3, 32, 32), torch.tensor([1, 2]), "builtin")
    assert maps.shape == (2, 32, 32) and backend == "builtin" and torch.isfinite(maps).all()
