"""Results stay right however weights, buffers, dtypes and devices change between calls: each scenario is
compared with a freshly built model holding the same state."""
import copy
from types import SimpleNamespace

import pytest
import torch
from mmengine.hooks import EMAHook

from mmsecvit import SecViT


def tiny(**kwargs):
    return SecViT('tiny', cluster_size=16, **kwargs)


def fresh_copy(model):
    """A new SecViT with ``model``'s settings and state."""
    twin = tiny()
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def assert_same_outputs(model, x):
    with torch.no_grad():
        for got, want in zip(model(x), fresh_copy(model)(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture
def model_and_input():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        model(x)  # a first call, after which anything kept between calls would be stale
    return model, x


def test_weights_written_through_data(model_and_input):
    model, x = model_and_input
    for param in model.parameters():
        param.data.copy_(torch.randn_like(param) * 0.05)
    assert_same_outputs(model, x)


def test_load_state_dict_and_in_place_updates(model_and_input):
    model, x = model_and_input
    model.load_state_dict(tiny().state_dict())
    assert_same_outputs(model, x)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    assert_same_outputs(model, x)


def test_batch_norm_statistics_updated_without_grad(model_and_input):
    model, x = model_and_input
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 80) * 3 + 1)  # BN recalibration: running statistics change
    model.eval()
    assert_same_outputs(model, x)


def test_mmengine_ema_hook_swaps_weights_in(model_and_input):
    model, x = model_and_input
    runner = SimpleNamespace(model=model, iter=0, epoch=0)
    hook = EMAHook(momentum=0.5)
    hook.before_run(runner)
    hook.after_train_iter(runner, 0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hook.after_train_iter(runner, 1)  # the average now differs from the model's weights
    with torch.no_grad():
        before = model(x)
    hook.before_val_epoch(runner)  # swaps the averaged weights in through .data
    assert_same_outputs(model, x)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], before[0])
    hook.after_val_epoch(runner)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], before[0], rtol=0, atol=0)


def test_requires_grad_changes(model_and_input):
    model, x = model_and_input
    model.requires_grad_(False)
    assert_same_outputs(model, x)
    model.requires_grad_(True)
    with torch.no_grad():
        model.stages[0].blocks[0].attn.qkv.weight.mul_(0.5)
    assert_same_outputs(model, x)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16, torch.float16])
def test_model_held_in_another_dtype(model_and_input, dtype):
    model, x = model_and_input
    reference = [o.double() for o in copy.deepcopy(model).double()(x.double())]
    moved = model.to(dtype)
    with torch.no_grad():
        outs = moved(x.to(dtype))
    assert all(o.dtype == dtype for o in outs)
    tolerance = {torch.float64: 1e-10, torch.bfloat16: 0.25, torch.float16: 0.05}[dtype]
    for got, want in zip(outs, reference):
        assert torch.isfinite(got).all()
        error = (got.double() - want).norm() / want.norm()
        assert error < tolerance, f'relative error {error:.3g} in {dtype}'


def test_one_and_two_threads_give_the_same_outputs(backend):
    # Bitwise: every kernel splits its work so that no sum depends on the thread count, and the rankings
    # are the same for the same keys.
    model = tiny().eval()
    x = torch.randn(2, 3, 96, 128)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs.append(model(x))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*outputs):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_training_steps_with_the_same_seed_give_the_same_loss():
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        model = tiny(drop_path_rate=0.1).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(2, 3, 64, 80)
        run = []
        for _ in range(2):
            loss = sum(o.square().mean() for o in model(x))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]
