"""The model registry: every model builds and trains, freezing trains only what it should,
weights load from where the user says (and never from the network in tests)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from components.nn import models
from components.nn.models import (
    MODELS,
    Backbone,
    Classifier,
    ModelError,
    WeightsFallbackWarning,
    count_parameters,
    create_model,
    get_spec,
    imagenet_weights_path,
    list_models,
    model_normalization,
    register_model,
)

# The models the docs promise: none may go missing. Every test below that should hold for
# every model iterates `list_models()` instead, so a newly registered model is tested too.
PROMISED = {"custom_cnn", "lenet5", "resnet18", "resnet50", "vgg16", "mobilenetv2",
            "efficientnet_b0", "googlenet", "convmixer"}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _batch(size: int, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, size, size), torch.arange(n) % 3


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _as_if_pretrained(model: Classifier, size: int) -> Classifier:
    """Give every backbone BatchNorm the statistics of a batch, as pretrained weights would.

    Frozen blocks run in eval mode, and a random-init backbone there can output ~0
    (efficientnet_b0 does), which leaves the head's BatchNorm nothing to learn from.
    """
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: one batch's statistics exactly
    model.backbone.train()
    with torch.no_grad():
        model.backbone(torch.randn(8, 3, size, size))
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    return model.train()  # frozen blocks back to eval


def _one_step(model: nn.Module, size: int = 32, n: int = 4) -> None:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=0.05)
    x, y = _batch(size, n)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# ---------------------------------------------------------------------------- every model


def test_registry_keeps_the_promised_models_and_lists_them_by_name():
    assert set(list_models()) >= PROMISED
    # Registered custom_cnn, lenet5, convmixer, ... and listed by name, whatever the order of
    # registration: two late registrations in reverse order land in their places too.
    assert [n for n in list_models() if n in PROMISED] == [
        "convmixer", "custom_cnn", "efficientnet_b0", "googlenet", "lenet5", "mobilenetv2",
        "resnet18", "resnet50", "vgg16"]
    builder = MODELS["custom_cnn"].builder
    try:
        register_model("zz_probe_net")(builder)
        register_model("aa_probe_net")(builder)
        listed = list_models()
        assert listed[0] == "aa_probe_net" and listed[-1] == "zz_probe_net", listed
    finally:
        MODELS.pop("zz_probe_net", None)
        MODELS.pop("aa_probe_net", None)


@pytest.mark.parametrize("name", list_models())
def test_model_trains_at_its_min_size_channels_last_and_autocast(name):
    size = get_spec(name).min_image_size
    model, source = create_model(name, 3, image_size=size)
    assert source == "random" and isinstance(model, Classifier) and model.num_blocks >= 2
    # The seeds' head, at the model's default width, fed by the whole backbone.
    head = [type(m).__name__ for m in model.head]
    assert head == ["Linear", "_HeadBatchNorm", "ReLU", "Dropout", "Linear"]
    assert model.head[0].out_features == get_spec(name).default_head_hidden
    with torch.no_grad():
        features = model.eval().features(torch.randn(2, 3, size, size))
    assert model.head[0].in_features == features.shape[1]
    # Each backbone parameter belongs to exactly one block, so freezing never misses one.
    backbone = list(model.backbone.parameters())
    in_blocks = [id(p) for block in model.blocks for p in block.parameters()]
    assert sorted(in_blocks) == sorted(id(p) for p in backbone) and backbone
    model = model.to(memory_format=torch.channels_last)
    x, y = _batch(size)
    logits = model.train()(x.to(memory_format=torch.channels_last))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in model.parameters())

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval()(x)
    assert out.shape == (2, 3) and torch.isfinite(out.float()).all()

    with pytest.raises(ModelError, match=f"at least {size} px"):
        create_model(name, 3, image_size=size - 1)


def test_vgg16_really_needs_32_px():
    model, _ = create_model("vgg16", 3)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 31, 31))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError) as err:
        create_model("mobilenet_v2", 3)
    message = str(err.value)
    assert "unknown model 'mobilenet_v2'" in message and "mobilenetv2" in message
    assert all(name in message for name in list_models()) and "\n" not in message
    with pytest.raises(ModelError, match="choose one of"):
        model_normalization("nope")


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 1}, "num_classes"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"head_hidden": -4}, "head_hidden"),
    ({"weights": "imagenet21k"}, "none, imagenet, auto"),
    ({"freeze": "layers"}, "none, backbone or partial:N"),
    ({"freeze": "partial:0"}, "partial:N"),
    ({"freeze": "partial:x"}, "partial:N"),
])
def test_bad_arguments_raise_model_error(kwargs, match):
    args = {"num_classes": 3, **kwargs}
    with pytest.raises(ModelError, match=match):
        create_model("custom_cnn", **args)


def test_head_is_the_seeds_head_with_per_model_default_width():
    model, _ = create_model("resnet50", 3, dropout=0.3, head_hidden=0)
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["Linear", "_HeadBatchNorm", "ReLU", "Dropout", "Linear"]
    assert (model.head[0].in_features, model.head[0].out_features) == (2048, 64)
    assert model.head[3].p == 0.3 and model.head[4].out_features == 3
    assert create_model("vgg16", 3)[0].head[0].in_features == 512
    assert create_model("mobilenetv2", 3)[0].head[0].out_features == 256
    assert create_model("mobilenetv2", 3, head_hidden=32)[0].head[0].out_features == 32


def test_batch_of_one_trains_without_crashing():
    model, _ = create_model("custom_cnn", 3)
    assert model.train()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_normalization_and_parameter_counts():
    assert model_normalization("resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model, _ = create_model("custom_cnn", 3, freeze="backbone")
    head = sum(p.numel() for p in model.head.parameters())
    assert count_parameters(model, trainable_only=True) == head
    assert count_parameters(model) == head + sum(p.numel() for p in model.backbone.parameters())


def test_adding_a_model_is_one_function_and_one_decorator():
    @register_model("tiny_test_net", min_image_size=4, default_head_hidden=8)
    def tiny(image_size=None):
        body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1))
        return Backbone(body, [["0"], ["1"]], features=6)

    try:
        assert "tiny_test_net" in list_models()
        model, _ = create_model("tiny_test_net", 2, freeze="partial:1", image_size=4)
        assert model(torch.randn(2, 3, 4, 4)).shape == (2, 2)
        assert count_parameters(model, trainable_only=True) < count_parameters(model)
        with pytest.raises(ModelError, match="already registered"):
            register_model("tiny_test_net")(tiny)
    finally:
        MODELS.pop("tiny_test_net", None)


# ---------------------------------------------------------------------------- freezing


def _changed(model: Classifier, before: dict[str, torch.Tensor]) -> set[str]:
    after = model.state_dict()
    return {k for k in after if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name", list_models())
def test_freeze_backbone_trains_only_the_head(name):
    size = max(32, get_spec(name).min_image_size)
    model, _ = create_model(name, 3, freeze="backbone", image_size=size)
    _as_if_pretrained(model, size)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"head.{n}" for n, _ in model.head.named_parameters()}
    before = _snapshot(model)
    _one_step(model, size)
    changed = _changed(model, before)
    # backbone: weights *and* BN running stats untouched; every head tensor moved
    assert not any(k.startswith("backbone.") for k in changed)
    assert {f"head.{k}" for k in model.head.state_dict()} <= changed
    assert all(not m.training for block in model.blocks for sub in block for m in sub.modules())
    assert model.head.training


@pytest.mark.parametrize("name, n", [(name, 1) for name in list_models()]
                         + [("resnet18", 2), ("mobilenetv2", 3)])
def test_partial_freeze_trains_head_and_last_n_blocks(name, n):
    size = max(32, get_spec(name).min_image_size)
    model, _ = create_model(name, 3, freeze=f"partial:{n}", image_size=size)
    _as_if_pretrained(model, size)
    blocks = model.blocks
    before = _snapshot(model)
    _one_step(model, size)
    for i, block in enumerate(blocks):
        trainable = i >= len(blocks) - n
        for m in (m for sub in block for m in sub.modules()):
            assert m.training == trainable
        for p in block.parameters():
            assert p.requires_grad == trainable
        for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
            moved = not torch.equal(bn.running_mean, _buffer_before(model, before, bn))
            assert moved == trainable, (i, trainable)
    changed = _changed(model, before)
    assert {k for k, p in model.named_parameters() if p.requires_grad} <= changed
    assert not {k for k, p in model.named_parameters() if not p.requires_grad} & changed


def _buffer_before(model: nn.Module, before: dict[str, torch.Tensor], bn: nn.Module):
    name = next(n for n, m in model.named_modules() if m is bn)
    return before[f"{name}.running_mean"]


def test_freeze_none_trains_everything():
    model, _ = create_model("custom_cnn", 3, freeze="none")
    before = _snapshot(model)
    _one_step(model)
    assert {k for k, _ in model.named_parameters()} <= _changed(model, before)


def test_partial_out_of_range_names_the_block_count():
    with pytest.raises(ModelError, match="only 5 backbone blocks"):
        create_model("resnet18", 3, freeze="partial:6")
    assert create_model("resnet18", 3, freeze="partial:5")[0].frozen_blocks == 0


# ---------------------------------------------------------------------------- weights


def test_auto_without_cached_weights_falls_back_with_a_warning():
    with pytest.warns(WeightsFallbackWarning, match="resnet18-f37072fd.pth"):
        model, source = create_model("resnet18", 3, weights="auto")
    assert source == "random-fallback" == model.weights_source
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert create_model("custom_cnn", 3, weights="auto")[1] == "random"


def test_imagenet_offline_names_the_file_to_place(monkeypatch):
    monkeypatch.setattr(models, "_reachable", lambda url: False)  # never hit the network
    with pytest.raises(ModelError) as err:
        create_model("resnet50", 3, weights="imagenet")
    message = str(err.value)
    assert "resnet50-11ad3fa6.pth" in message and str(imagenet_weights_path("resnet50").parent)
    assert "--weights none" in message
    with pytest.raises(ModelError, match="no ImageNet weights"):
        create_model("custom_cnn", 3, weights="imagenet")


def test_cached_imagenet_file_is_used_by_imagenet_and_auto(tmp_path, monkeypatch):
    from torchvision.models import get_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = imagenet_weights_path("mobilenetv2")
    assert target.name == "mobilenet_v2-7ebf99e0.pth"
    target.parent.mkdir(parents=True)
    reference = get_model("mobilenet_v2", weights=None).state_dict()  # stands in for ImageNet
    torch.save(reference, target)
    for weights in ("imagenet", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model, source = create_model("mobilenetv2", 3, weights=weights, freeze="backbone")
        assert source == "imagenet"
        assert all(torch.equal(v, reference[k]) for k, v in model.backbone.state_dict().items())


def test_state_dict_path_reproduces_the_model(tmp_path):
    a, _ = create_model("resnet18", 3, head_hidden=16)
    _one_step(a)  # move BN stats and weights away from init
    path = tmp_path / "a.pt"
    torch.save(a.state_dict(), path)
    b, source = create_model("resnet18", 3, head_hidden=16, weights=str(path), freeze="backbone")
    assert source == "file:a.pt"
    x, _ = _batch(32)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_torchvision_state_dict_loads_into_the_backbone_only(tmp_path):
    from torchvision.models import get_model

    reference = get_model("resnet18", weights=None).state_dict()
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}}, path)
    model, source = create_model("resnet18", 4, weights=str(path))
    assert source == "file:tv.pth"
    assert all(torch.equal(v, reference[k]) for k, v in model.backbone.state_dict().items())


def test_other_heads_load_backbone_only_and_foreign_files_fail(tmp_path):
    a, _ = create_model("custom_cnn", 3)
    path = tmp_path / "cnn.pt"
    torch.save(a.state_dict(), path)
    with pytest.warns(UserWarning, match="head starts fresh"):
        b, _ = create_model("custom_cnn", 5, weights=str(path))
    assert torch.equal(a.backbone.block1[0].weight, b.backbone.block1[0].weight)
    with pytest.raises(ModelError, match="no parameter"), pytest.warns(UserWarning):
        create_model("resnet18", 3, weights=str(path))


def test_bad_weight_files_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        create_model("custom_cnn", 3, weights=str(tmp_path / "missing.pt"))
    pickled = tmp_path / "whole.pt"
    torch.save(copy.deepcopy(create_model("lenet5", 3)[0]), pickled)  # a model, not a dict
    with pytest.raises(ModelError, match="state dict"):
        create_model("lenet5", 3, weights=str(pickled))
    with pytest.raises(ModelError, match="does not fit"):
        small = tmp_path / "patch2.pt"
        torch.save(create_model("convmixer", 3, image_size=32)[0].state_dict(), small)
        create_model("convmixer", 3, image_size=224, weights=str(small))
