"""Encoder stem (Appendix B.1), MLP head (Section 3.6), BYOL's target network and EMA update."""
import pytest
import torch
import torch.nn as nn
import torchvision

import common
from support import runs
from byol import BYOL, byol_loss
from conftest import TinyEncoder


def test_cifar_stem():
    enc, dim = common.build_encoder("resnet18", "cifar")
    assert dim == 512
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
    assert isinstance(enc.maxpool, nn.Identity) and isinstance(enc.fc, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    stages = nn.Sequential(enc.conv1, enc.bn1, enc.relu, enc.maxpool, enc.layer1, enc.layer2, enc.layer3, enc.layer4)
    assert stages(x).shape == (2, 512, 4, 4)          # 32x32 reaches the last stage at 4x4
    assert enc(x).shape == (2, 512)


@pytest.mark.parametrize("arch,last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_residual_blocks_start_as_identity(arch, last_bn):
    """As BYOL's (Haiku) and SimCLR's ResNets: each block's last BatchNorm scale starts at zero; without BatchNorm
    (Table 4) there is none to zero."""
    enc, _ = common.build_encoder(arch, "imagenet")
    blocks = common.residual_blocks(enc)
    assert len(blocks) == {"resnet18": 8, "resnet50": 16}[arch]
    for name, block in blocks.items():
        assert torch.equal(getattr(block, last_bn).weight, torch.zeros_like(getattr(block, last_bn).weight)), name
        assert block.bn1.weight.eq(1).all()
    assert common.build_encoder(arch, "imagenet", batchnorm=False)[0](torch.randn(1, 3, 32, 32)).abs().sum() > 0


def test_imagenet_stem_and_auto_choice():
    enc, dim = common.build_encoder("resnet50", "imagenet")
    assert dim == 2048 and enc.conv1.kernel_size == (7, 7) and isinstance(enc.maxpool, nn.MaxPool2d)
    assert common.resolve_stem("auto", "cifar100") == "cifar"
    assert common.resolve_stem("auto", "stl10") == "imagenet"
    assert common.resolve_stem("cifar", "stl10") == "cifar"


def test_mlp_head_shape():
    head = common.mlp(512, 4096, 256)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].out_features == 4096 and head[3].out_features == 256
    assert head[0].bias is not None and head[3].bias is None  # BYOL's last Linear has no bias
    assert head(torch.randn(4, 512)).shape == (4, 256)


def test_target_network_gets_no_gradients():
    torch.manual_seed(0)
    model = BYOL(TinyEncoder(16), 16, hidden_dim=32, proj_dim=8)
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    out = model(x1, x2)
    (byol_loss(out["p1"], out["t2"]) + byol_loss(out["p2"], out["t1"])).backward()
    for p in list(model.target_encoder.parameters()) + list(model.target_projector.parameters()):
        assert not p.requires_grad and p.grad is None
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_target_starts_as_copy_and_ema_matches_formula():
    torch.manual_seed(0)
    model = BYOL(TinyEncoder(16), 16, hidden_dim=32, proj_dim=8)
    for (o, t) in model.online_target_pairs():
        for po, pt in zip(o.parameters(), t.parameters()):
            assert torch.equal(po, pt) and po.data_ptr() != pt.data_ptr()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.named_parameters()}
    tau = 0.9
    model.update_target(tau)
    for name, p in model.named_parameters():
        if name.startswith("target_"):
            online = before[name.replace("target_", "", 1)]
            assert torch.allclose(p, tau * before[name] + (1 - tau) * online, atol=1e-6), name
        else:
            assert torch.equal(p, before[name])     # the online network is not touched by the EMA


def test_exported_encoder_loads_into_torchvision(tmp_path):
    model = BYOL(*common.build_encoder("resnet18", "cifar"), hidden_dim=32, proj_dim=8)
    torch.save(runs.encoder_state(model), tmp_path / "encoder.pt")
    # what the README shows:
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), model.encoder.eval()(x))


def test_no_batchnorm_removes_every_batchnorm():
    enc, dim = common.build_encoder("resnet18", "cifar", batchnorm=False)
    model = BYOL(enc, dim, hidden_dim=32, proj_dim=8, batchnorm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))["p1"].shape == (2, 8)
