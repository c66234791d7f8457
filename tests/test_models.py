import shutil

import pytest
import torch

from emoshield.errors import EmoshieldError
from emoshield.models import BACKBONES, ModelConfig, build_model, imagenet_available, load_model, save_model
from emoshield.models.backbones import hub_checkpoint_dir
from emoshield.models.network import load_compatible_weights

CLASSES = ["disgust", "fear", "happy", "sad", "surprise"]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("head", ["localization", "backbone"])
def test_every_backbone_and_head_maps_images_to_logits(backbone, head):
    size = max(64, BACKBONES[backbone].min_input_size)
    model = build_model(ModelConfig(backbone, CLASSES, size, head=head)).eval()
    out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    x = torch.rand(2, 3, size, size)
    feats = model.forward_features(x)
    assert feats.shape[1] == BACKBONES[backbone].feature_channels
    assert torch.allclose(model.forward_head(feats), model(x))


def test_localization_head_layout_and_pooling_choices():
    model = build_model(ModelConfig("resnet18", CLASSES, 128, pooling="window:4"))
    head = model.head
    assert isinstance(head.pool, torch.nn.AvgPool2d) and isinstance(head.norm, torch.nn.BatchNorm2d)
    assert head.fc1.in_features == 512 and head.fc1.out_features == 256 and head.fc2.out_features == 5
    grid = build_model(ModelConfig("resnet18", CLASSES, 64, pooling="grid:2")).head
    assert grid.fc1.in_features == 512 * 4
    with pytest.raises(EmoshieldError, match="does not fit"):
        build_model(ModelConfig("resnet18", CLASSES, 64, pooling="window:4"))  # 2x2 map
    with pytest.raises(EmoshieldError, match="bad pooling"):
        build_model(ModelConfig("resnet18", CLASSES, 64, pooling="max"))
    with pytest.raises(EmoshieldError, match="too small for alexnet"):
        build_model(ModelConfig("alexnet", CLASSES, 48))


def test_normalization_lives_inside_the_model():
    model = build_model(ModelConfig("smallcnn", CLASSES, 48)).eval()
    x = torch.rand(3, 3, 48, 48)
    manual = model.forward_head(model.features((x - model.normalize.mean) / model.normalize.std))
    assert torch.allclose(model(x), manual)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_imagenet_mobilenet_loads_offline_with_hash_check():
    assert imagenet_available("mobilenet_v2") == "IMAGENET1K_V1", "make setup places the packaged weights"
    from torchvision.models import mobilenet_v2

    model = build_model(ModelConfig("mobilenet_v2", CLASSES, 64, weights="imagenet"))
    assert model.config.weights == "imagenet:IMAGENET1K_V1"
    reference = mobilenet_v2()
    reference.load_state_dict(torch.load(hub_checkpoint_dir() / "mobilenet_v2-b0353104.pth", weights_only=True))
    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)


def test_missing_and_corrupt_imagenet_weights_give_one_line_errors(tmp_path, monkeypatch):
    original = torch.hub.get_dir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(EmoshieldError, match=r"vgg16 not found: put vgg16-397923af\.pth") as err:
        build_model(ModelConfig("vgg16", CLASSES, 64, weights="imagenet"))
    assert "\n" not in str(err.value)
    (tmp_path / "checkpoints").mkdir()
    shutil.copyfile(f"{original}/checkpoints/mobilenet_v2-b0353104.pth", tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth")
    with open(tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth", "r+b") as f:
        f.seek(1000)
        f.write(b"tampered")
    with pytest.raises(EmoshieldError, match="does not match the prefix b0353104"):
        build_model(ModelConfig("mobilenet_v2", CLASSES, 64, weights="imagenet"))
    with pytest.raises(EmoshieldError, match="no ImageNet weights"):
        build_model(ModelConfig("smallcnn", CLASSES, 48, weights="imagenet"))


def test_save_load_roundtrip_without_pickle(tmp_path):
    model = build_model(ModelConfig("smallcnn", CLASSES, 48, dropout=0.1)).eval()
    save_model(model, tmp_path / "m.safetensors", {"note": "test"})
    assert b"pickle" not in (tmp_path / "m.safetensors").read_bytes()[:200]
    back = load_model(tmp_path / "m.safetensors")
    x = torch.rand(4, 3, 48, 48)
    assert torch.equal(model(x), back(x)) and back.config.classes == CLASSES and back.config.dropout == 0.1


def test_safetensors_weights_seed_a_model_with_other_classes(tmp_path):
    seven = build_model(ModelConfig("smallcnn", CLASSES + ["angry", "neutral"], 48))
    save_model(seven, tmp_path / "seven.safetensors")
    five = build_model(ModelConfig("smallcnn", CLASSES, 48, weights=str(tmp_path / "seven.safetensors")))
    assert torch.equal(five.features[0].weight, seven.features[0].weight)
    assert torch.equal(five.head.fc1.weight, seven.head.fc1.weight)  # same shape: taken
    assert five.head.fc2.weight.shape == (5, 256)  # other shape: fresh
    other = build_model(ModelConfig("resnet18", CLASSES, 48))
    with pytest.raises(EmoshieldError, match="not smallcnn feature weights"):
        load_compatible_weights(build_model(ModelConfig("smallcnn", CLASSES, 48)), _save(other, tmp_path / "r.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(EmoshieldError, match="junk.safetensors is not a valid safetensors"):
        build_model(ModelConfig("smallcnn", CLASSES, 48, weights=str(tmp_path / "junk.safetensors")))


def _save(model, path):
    save_model(model, path)
    return path


def test_freeze_features():
    model = build_model(ModelConfig("smallcnn", CLASSES, 48))
    model.freeze_features()
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_flip_tta_averages_the_face_and_its_mirror_and_is_mirror_invariant():
    import torch

    from emoshield.errors import EmoshieldError
    from emoshield.models import ModelConfig, build_model
    from emoshield.models.tta import ViewAverage, with_tta

    torch.manual_seed(0)
    net = build_model(ModelConfig("smallcnn", ["a", "b", "c"], 32))
    assert with_tta(net, "flip").config is net.config and with_tta(net, "none") is net  # evaluate reads .config
    # a linear model: its answer depends on where things are (an untrained CNN answers noise near-constantly)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    x = torch.rand(5, 3, 8, 8)
    tta = with_tta(model, "flip")
    assert isinstance(tta, ViewAverage) and not tta.training  # the wrapped model's mode (reports check it)
    with torch.no_grad():
        out = tta(x)
        expected = ((model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2).log()
        assert torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)  # log-probabilities: valid logits
        assert torch.allclose(tta(x.flip(-1)), out, atol=1e-5)  # a mirrored face gets the same answer
        assert not torch.allclose(model(x.flip(-1)), model(x), atol=1e-3)  # (the model alone is not symmetric)
    x.requires_grad_(True)
    torch.nn.functional.cross_entropy(tta(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks differentiate through both views
    # a class whose probability underflows float32 still gets a gradient (a clamp before log would zero it)
    steep = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    with torch.no_grad():
        steep[1].bias.copy_(torch.tensor([0.0, 200.0, -200.0]))
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = with_tta(steep, "flip")(x)
    assert out[:, 2].max() < -100  # log-probability ~ -400: underflows as a probability
    out[:, 2].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(EmoshieldError, match="flip"):
        with_tta(model, "crops")


def test_ten_crop_views_are_the_same_function_in_torch_and_on_the_device():
    """The device (numpy, no torch) and `evaluate --tta tencrop` (torch) build the same ten views;
    the resize is the bilinear one of OpenCV (half-pixel centres); the average is a valid logit."""
    import cv2
    import numpy as np
    import torch

    from emoshield.models.tta import torch_views, with_tta
    from emoshield.views import crop_boxes, mean_probabilities, numpy_views, resize_matrix

    rng = np.random.default_rng(0)
    faces = rng.random((3, 3, 48, 48), dtype=np.float32)
    for mode, count in (("flip", 2), ("tencrop", 10)):
        ours = numpy_views(faces, mode)
        assert ours.shape == (count * 3, 3, 48, 48) and ours.dtype == np.float32
        assert np.abs(torch_views(torch.from_numpy(faces), mode).numpy() - ours).max() < 1e-5
    assert crop_boxes(48) == [(0, 0, 43), (0, 5, 43), (5, 0, 43), (5, 5, 43), (2, 2, 43)]
    views = numpy_views(faces, "tencrop")
    top, left, side = crop_boxes(48)[3]  # view 6 = the bottom-right crop of face 1, resized as OpenCV would
    crop = faces[1, :, top:top + side, left:left + side].transpose(1, 2, 0)
    opencv = cv2.resize(crop, (48, 48), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    assert np.abs(views[6 * 3 + 1] - opencv).max() < 1e-4
    assert np.allclose(views[7 * 3 + 1], views[6 * 3 + 1][..., ::-1])  # each crop is followed by its mirror
    assert np.allclose(resize_matrix(48, 43).sum(1), 1) and np.allclose(resize_matrix(48, 48), np.eye(48))
    probabilities = rng.random((30, 4))
    assert np.allclose(mean_probabilities(probabilities, "tencrop")[2], probabilities[2::3].mean(0))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 48 * 48, 4)).eval()
    x = torch.from_numpy(faces).requires_grad_(True)
    out = with_tta(model, "tencrop")(x)
    with torch.no_grad():
        expected = mean_probabilities(model(torch.from_numpy(numpy_views(faces, "tencrop"))).softmax(1).numpy(),
                                      "tencrop")
    assert np.allclose(out.exp().detach().numpy(), expected, atol=1e-5)
    out[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0  # attacks differentiate through every view
