"""The backbone on the device named by ``pytest --device`` (cpu by default; tools/gpu_check.sh passes cuda):
outputs and gradients against the official reference network run on the CPU, the ranking under autocast,
models held in half precision, and a mixed-precision training step."""
import pytest
import torch

from mmsecvit import SecViT
from mmsecvit.ops import semantic_order

from helpers import relative_error
from official_reference import build_pair

HALF_PRECISION_TOLERANCE = {torch.float16: 0.05, torch.bfloat16: 0.25}  # relative error of the outputs


@pytest.fixture(autouse=True)
def full_float32_precision():
    """cuDNN convolutions use TF32 by default on recent GPUs, which rounds to 10 mantissa bits."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def test_float64_outputs_and_gradients_match_the_official_reference(device):
    official, ours = build_pair('tiny', num_clusters=(8, 4, 2, -1))
    ours.to(device)
    x = torch.randn(2, 3, 97, 131, dtype=torch.double, requires_grad=True)
    x_device = x.detach().to(device).requires_grad_()
    expected, actual = official.forward_stages(x), ours(x_device)
    grads = [torch.randn_like(e) for e in expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e)
    torch.autograd.backward(expected, grads)
    torch.autograd.backward(actual, [g.to(device) for g in grads])
    torch.testing.assert_close(x_device.grad.cpu(), x.grad)


def test_float32_outputs_match_the_official_reference_in_float64(device):
    # Global attention in every stage: no ranking, so float32 rounding cannot move a token between clusters.
    official, ours = build_pair('tiny', num_clusters=(-1, -1, -1, -1))
    ours.float().to(device)
    x = torch.randn(1, 3, 64, 96, dtype=torch.double)
    with torch.no_grad():
        expected, actual = official.forward_stages(x), ours(x.float().to(device))
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        assert relative_error(a, e) < 1e-5


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_ranking_under_autocast_is_the_float32_ranking(device, dtype):
    packed = torch.randn(2, 4200, 2, 3, 32)
    packed[:, :, :, 1] += 2.0  # a common key offset: half-precision scores overflow or tie
    keys = packed.to(dtype)
    expected = semantic_order(keys.float())
    with torch.autocast(device.type, dtype=dtype):
        order = semantic_order(keys.to(device))
    torch.testing.assert_close(order.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_model_held_in_half_precision(device, dtype):
    official, ours = build_pair('tiny', num_clusters=(8, 4, 2, -1))
    x = torch.randn(1, 3, 64, 96, dtype=torch.double)
    with torch.no_grad():
        expected = official.forward_stages(x)
        actual = ours.to(device, dtype)(x.to(device, dtype))
    for a, e in zip(actual, expected):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert relative_error(a, e) < HALF_PRECISION_TOLERANCE[dtype]


def test_mixed_precision_training_step(device):
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    model = SecViT('tiny', cluster_size=16).to(device).train()
    x = torch.randn(2, 3, 64, 96, device=device)
    with torch.autocast(device.type, dtype=dtype):
        outs = model(x)
        loss = sum(o.float().pow(2).mean() for o in outs)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
