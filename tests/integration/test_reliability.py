"""Results stay right however weights, buffers, dtypes and devices change between calls: each scenario is
compared with a freshly built model holding the same state."""
import copy
from types import SimpleNamespace

import pytest
import torch
from mmengine.hooks import EMAHook

from mmsecvit import SecViT
from mmsecvit.ops import attention, dispatch, use_kernels

from helpers import relative_error


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
        error = relative_error(got, want)
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


RANKING = attention.semantic_order


def replay_clusters(monkeypatch, orders):
    """Make every attention layer use the next of ``orders`` (each layer's ranking, appended when it is
    empty): near-tied keys whose float32 scores round apart on one path and tie on another would otherwise
    swap clusters, a difference of the input, not of the paths."""
    calls = iter(range(10 ** 6))

    def semantic_order(packed, rope=None):
        index = next(calls)
        if index == len(orders):
            orders.append(RANKING(packed, rope))
        return orders[index]

    monkeypatch.setattr(attention, 'semantic_order', semantic_order)


def test_random_images_agree_between_the_kernels_and_the_pytorch_paths(monkeypatch):
    # A seeded sweep of whole-backbone cases: odd heights, prime widths, 1-3 images, both cluster modes,
    # eval and train, each kernel build against the PyTorch paths with the clusters of the PyTorch run.
    # Parameter gradients are compared as one vector: the conv biases before train-mode batch norms have a
    # true gradient of zero, so theirs are rounding noise on either path.
    generator = torch.Generator().manual_seed(0)
    primes = (37, 53, 67, 97, 131, 149, 197, 223, 257, 311)
    worst = 0.0
    for case in range(8):
        height = int(torch.randint(33, 400, (1,), generator=generator)) | 1
        width = primes[int(torch.randint(0, len(primes), (1,), generator=generator))]
        batch = int(torch.randint(1, 4, (1,), generator=generator))
        mode = (dict(cluster_size=int(torch.randint(8, 100, (1,), generator=generator))) if case % 2
                else dict(num_clusters=(8, 4, 2, -1)))
        training = case % 4 >= 2
        torch.manual_seed(case)
        model = SecViT('tiny', drop_path_rate=0.0, **mode).train(training)
        x = torch.randn(batch, 3, height, width, generator=generator)
        results, orders = {}, []
        for isa in ['pytorch'] + dispatch.cpu_isas():
            replay_clusters(monkeypatch, orders)
            inputs = x.clone().requires_grad_(training)
            with use_kernels(isa != 'pytorch', isa=None if isa == 'pytorch' else isa), torch.set_grad_enabled(training):
                outs = model(inputs)
                if training:
                    sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
            grads = [inputs.grad, torch.cat([p.grad.flatten() for p in model.parameters()])] if training else []
            results[isa] = [o.detach() for o in outs] + grads
            model.zero_grad(set_to_none=True)
        for isa in dispatch.cpu_isas():
            for got, want in zip(results[isa], results['pytorch']):
                error = relative_error(got, want)
                assert error < 1e-5, (f'case {case} ({batch}x{height}x{width}, {mode}, train={training}), {isa} '
                                      f'kernels: {error:.3g}')
                worst = max(worst, error)
    print(f'8 cases x {len(dispatch.cpu_isas())} kernel builds, worst relative difference {worst:.3g}')
