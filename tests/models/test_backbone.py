import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmsecvit.models import SecViT, SecViTClassifier
from mmsecvit.models.secvit import ARCH_SETTINGS, SECAttention, resolve_arch
from mmsecvit.ops import cluster_length, rope_angles, rope_tables, use_kernels

from helpers import assert_float32_close
from official_reference import (
    OFFICIAL_PARAMS,
    build_pair,
    num_params,
    official_model,
    reference_cluster_attention,
    reference_rope,
)


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base', 'large'])
def test_classifier_has_official_parameter_count(arch):
    assert num_params(SecViTClassifier(arch, num_classes=1000)) == OFFICIAL_PARAMS[arch]


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base', 'large'])
def test_backbone_parameter_count_derived_from_official(arch):
    dims = ARCH_SETTINGS[arch]['embed_dims']
    head = dims[-1] * 1024 + 1024 + 2 * 1024 + 1024 * 1000 + 1000
    output_norms = sum(2 * c for c in dims)
    assert num_params(SecViT(arch)) == OFFICIAL_PARAMS[arch] - head + output_norms


def test_official_architecture_reference_has_official_counts():
    # The test-side reference must itself be the official network, or comparing to it proves nothing.
    assert num_params(official_model('tiny')) == OFFICIAL_PARAMS['tiny']
    assert num_params(official_model('base')) == OFFICIAL_PARAMS['base']


def test_arch_aliases_and_errors():
    assert SecViT('s').depths == SecViT('small').depths == (3, 4, 18, 4)
    with pytest.raises(KeyError, match=r"Unknown SecViT arch 'huge'.*'base'.*'tiny'"):
        SecViT('huge')
    with pytest.raises(KeyError, match='missing'):
        SecViT(dict(embed_dims=(32, 64), depths=(1, 1)))
    with pytest.raises(ValueError, match='one entry per stage'):
        SecViT('tiny', num_clusters=(8, 4))
    with pytest.raises(ValueError, match='not both'):
        SecViT('tiny', num_clusters=8, cluster_size=98)
    custom = resolve_arch(dict(embed_dims=(32, 64), depths=(1, 2), num_heads=(1, 2)))
    assert custom['layer_scale'] == (False, False) and custom['mlp_ratio'] == 3.0


@pytest.mark.parametrize('size', [(224, 224), (511, 517), (97, 131), (800, 1344)])
@pytest.mark.parametrize('mode', [dict(), dict(cluster_size=98)])
def test_output_shapes_at_any_size(size, mode):
    model = SecViT('tiny', **mode).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert model.out_channels == (64, 128, 256, 512)
    for i, out in enumerate(outs):
        stride = 4 * 2 ** i
        assert out.shape == (1, model.out_channels[i], math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert out.is_contiguous() and torch.isfinite(out).all()


def test_out_indices_select_outputs():
    model = SecViT('tiny', out_indices=(1, 3)).eval()
    outs = model(torch.randn(2, 3, 64, 96))
    assert [o.shape[1] for o in outs] == [128, 512] == list(model.out_channels)
    assert not hasattr(model, 'norm0') and hasattr(model, 'norm3')
    unordered = SecViT('tiny', out_indices=(2, 0)).eval()
    with torch.no_grad():
        outs = unordered(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 256] == list(unordered.out_channels)  # stage order


def test_stages_after_the_last_output_are_not_built():
    full = SecViT('tiny').eval()
    early = SecViT('tiny', out_indices=(0, 2))
    assert len(early.stages) == 3 and early.stages[2].downsample is None
    early.load_state_dict({k: v for k, v in full.state_dict().items() if k in early.state_dict()})
    early.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = full(x)
        outs = early(x)
    torch.testing.assert_close(outs[0], expected[0])
    torch.testing.assert_close(outs[1], expected[2])
    early.train()
    sum(o.sum() for o in early(x)).backward()
    no_grad = [name for name, p in early.named_parameters() if p.grad is None]
    assert not no_grad  # DDP without find_unused_parameters needs every parameter used


def test_empty_out_indices_are_refused():
    with pytest.raises(ValueError, match='out_indices must name at least one stage'):
        SecViT('tiny', out_indices=())


@pytest.mark.parametrize('kwargs, message', [
    (dict(cluster_size=0), 'cluster_size entries must be -1'), (dict(cluster_size=-7), 'cluster_size entries'),
    (dict(num_clusters=0), 'num_clusters entries must be -1'), (dict(num_clusters=(32, 8, 2.5, -1)), 'num_clusters'),
    (dict(drop_path_rate=1.5), r'drop_path_rate must be in \[0, 1\)'), (dict(drop_path_rate=-0.1), 'drop_path_rate')])
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SecViT('tiny', **kwargs)


@pytest.mark.parametrize('backend_name', ['pytorch', 'kernels'])
def test_empty_batch_gives_empty_maps_on_every_path(backend_name):
    model = SecViT('tiny', cluster_size=16).eval()
    with use_kernels(backend_name == 'kernels'), torch.no_grad():
        outs = model(torch.randn(0, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(0, 64, 16, 24), (0, 128, 8, 12), (0, 256, 4, 6), (0, 512, 2, 3)]


@pytest.mark.parametrize('shape, message', [
    ((3, 64, 64), r'4-D tensor of shape \(B, 3, H, W\)'),
    ((1, 1, 64, 64), r'3 input channels'),
    ((1, 3, 16, 64), r'H and W >= 32'),
])
def test_bad_input_names_expected_shape(shape, message):
    with pytest.raises(ValueError, match=message):
        SecViT('tiny')(torch.randn(*shape))


@pytest.mark.parametrize('size', [(224, 224), (97, 131)])
def test_fixed_cluster_count_matches_official_reference(size):
    # 224: every count divides the tokens (official behaviour); 97x131: it does not, and the reference
    # clusters the real tokens only, with a shorter last cluster.
    official, ours = build_pair('tiny')
    x = torch.randn(2, 3, *size, dtype=torch.double)
    with torch.no_grad():
        expected = official.forward_stages(x)
        actual = ours(x)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_inference_folds_batch_norms_into_convolutions():
    # Without autograd the stem and downsampling batch norms are folded into their convolutions; the result
    # equals the layers run as they are, and follows changed statistics.
    model = SecViT('tiny', cluster_size=49).double().eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 7  # four in the stem, three downsampling layers

    def randomize():
        for norm in norms:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.data.normal_()
            norm.bias.data.normal_()

    randomize()
    x = torch.randn(1, 3, 64, 96, dtype=torch.double)
    for _ in range(2):
        expected = model(x)  # with autograd: the layers as they are
        with torch.no_grad():
            folded = model(x)
        for a, e in zip(folded, expected):
            torch.testing.assert_close(a, e)
        randomize()


def test_layer_scale_variant_matches_official_reference():
    official, ours = build_pair('base', num_clusters=(4, 2, 2, -1))
    x = torch.randn(1, 3, 96, 64, dtype=torch.double)
    with torch.no_grad():
        for a, e in zip(ours(x), official.forward_stages(x)):
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize('height, width, cluster_size', [(8, 8, 16), (7, 9, 10), (5, 5, 100), (16, 21, 49)])
def test_cluster_size_mode_matches_reference(height, width, cluster_size):
    attn = SECAttention(32, 2, cluster_size=cluster_size).double()
    x = torch.randn(2, height, width, 32, dtype=torch.double, requires_grad=True)
    rope = rope_tables(height, width, rope_angles(16).double(), key_scale=16 ** -0.5)
    out = attn(x, rope)

    n = height * width
    cluster_len = math.ceil(n / math.ceil(n / cluster_size))
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(2, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q = reference_rope(qkv[0], height, width)
    k = reference_rope(qkv[1], height, width) * 16 ** -0.5
    mixed = reference_cluster_attention(q, k, qkv[2], cluster_len).transpose(1, 2).reshape(2, height, width, 32)
    lepe = nn.Conv2d.forward(attn.lepe, qkv[2].transpose(-1, -2).reshape(2, 32, height, width)).permute(0, 2, 3, 1)
    expected = attn.proj(mixed + lepe)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_cluster_count_grows_with_image_in_cluster_size_mode():
    assert cluster_length(56 * 56, num_clusters=32) == 98
    assert cluster_length(200 * 336, num_clusters=32) == 2100  # official setting at 800x1344: quadratic
    assert cluster_length(200 * 336, cluster_size=98) == 98  # 686 clusters
    assert cluster_length(400 * 672, cluster_size=98) <= 98
    assert cluster_length(10, cluster_size=98) == 10
    assert cluster_length(100, num_clusters=-1) == 100


def test_frozen_stages_have_no_trainable_parameters():
    model = SecViT('tiny', frozen_stages=2)
    frozen = [model.patch_embed, model.stages[0], model.stages[1], model.norm0, model.norm1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())  # already in __init__
    assert all(p.requires_grad for p in model.stages[2].parameters())
    model.train()
    assert not model.patch_embed.training and not model.stages[1].training and model.stages[2].training
    with pytest.raises(ValueError, match='frozen_stages'):
        SecViT('tiny', frozen_stages=5)


def test_norm_eval_keeps_batch_norms_in_eval_mode():
    model = SecViT('tiny', norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    assert model.stages[0].blocks[0].training


def test_with_cp_gives_same_outputs_and_gradients():
    kwargs = dict(arch='tiny', cluster_size=16, drop_path_rate=0.0)
    plain, checkpointed = SecViT(**kwargs), SecViT(with_cp=True, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 96)
    results = []
    for model in (plain, checkpointed):
        model.train()
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)


def test_loss_reaches_every_trainable_parameter():
    model = SecViT('base', cluster_size=8, frozen_stages=0, drop_path_rate=0.0).train()
    outs = model(torch.randn(2, 3, 64, 64))
    # Random weights: the mean of a LayerNorm output has a zero gradient, so plain means would leave
    # the deeper stages only rounding noise.
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith('patch_embed') for n, _ in trainable)
    no_grad = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_default_init_matches_official():
    # Official: trunc_normal_(std=0.02) on every conv (bounds +-2, i.e. a plain normal), zero biases.
    model = SecViT('tiny')
    model.init_weights()
    for layer in (model.stages[2].blocks[0].attn.qkv, model.stages[0].blocks[1].ffn.fc2):
        assert abs(layer.weight.std().item() - 0.02) < 0.001 and abs(layer.weight.mean().item()) < 0.001
        assert layer.bias.abs().max() == 0


# 33x32 has 1056 tokens: the q/k/v and output projections take the 1x1-convolution path (linear_nhwc).
@pytest.mark.parametrize('height, width, cluster_size', [(9, 13, 20), (12, 12, 16), (6, 5, -1), (33, 32, 98)])
def test_fast_path_matches_reference_in_float32(height, width, cluster_size, attention_impl):
    # fp32 tolerance of the fast path (packed rows, the kernels or the chunked attention, complex RoPE; global
    # attention is PyTorch's fused one) against the plain loops, run in float64 so that only the fast path's
    # rounding is measured.
    attn = SECAttention(64, 2, cluster_size=cluster_size)
    x = torch.randn(2, height, width, 64, requires_grad=True)
    out = attn(x, rope_tables(height, width, rope_angles(32), key_scale=32 ** -0.5))
    n = height * width
    cluster_len = n if cluster_size < 0 else math.ceil(n / math.ceil(n / cluster_size))
    ref_attn = copy.deepcopy(attn).double()
    ref_x = x.detach().double().requires_grad_()
    qkv = F.linear(ref_x, ref_attn.qkv.weight, ref_attn.qkv.bias).reshape(2, n, 3, 2, 32).permute(2, 0, 3, 1, 4)
    q, k = reference_rope(qkv[0], height, width), reference_rope(qkv[1], height, width) * 32 ** -0.5
    mixed = reference_cluster_attention(q, k, qkv[2], cluster_len).transpose(1, 2).reshape(2, height, width, 64)
    lepe = nn.Conv2d.forward(ref_attn.lepe, qkv[2].transpose(-1, -2).reshape(2, 64, height, width)).permute(0, 2, 3, 1)
    expected = ref_attn.proj(mixed + lepe)
    assert_float32_close(out, expected, terms=64)
    # Parameter gradients sum over every token of both images.
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *attn.parameters()], grad)
    ref_grads = torch.autograd.grad(expected, [ref_x, *ref_attn.parameters()], grad.double())
    for a, b in zip(grads, ref_grads):
        assert_float32_close(a, b, terms=2 * n)


def test_runs_under_bf16_autocast():
    model = SecViT('tiny', cluster_size=16).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(torch.randn(1, 3, 64, 80))
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in outs)
    sum(o.float().mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('recompute', ['all', 'activation', True, ('activation', 'all', 'none', 'all')])
def test_recompute_ffn_changes_nothing_but_memory(recompute):
    kwargs = dict(arch='tiny', cluster_size=16, drop_path_rate=0.0)
    plain = SecViT(recompute_ffn=False, **kwargs).train()
    recomputing = SecViT(recompute_ffn=recompute, **kwargs).train()
    recomputing.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 128, 128)  # stage 1 has 1024 positions: its projections are 1x1 convolutions
    grads = []
    for model in (plain, recomputing):
        sum(o.square().mean() for o in model(x)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_recompute_ffn_modes_keep_less_for_backward():
    def saved_bytes(recompute_ffn, frozen_stages=-1):
        model = SecViT('tiny', cluster_size=16, recompute_ffn=recompute_ffn, frozen_stages=frozen_stages).train()
        storages = {}

        def keep(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(torch.randn(1, 3, 128, 128))
        return sum(storages.values())

    none, activation, everything = saved_bytes('none'), saved_bytes('activation'), saved_bytes('all')
    assert none > activation > everything
    # 'activation' keeps fc1's output (3x the block width) where 'all' keeps nothing beyond the input.
    tokens = sum((128 // 4 >> i) ** 2 * 3 * dims * depth
                 for i, (dims, depth) in enumerate(zip((64, 128, 256, 512), (2, 2, 9, 2))))
    assert activation - everything == tokens * 4
    assert everything < saved_bytes(True) < activation


def test_recompute_ffn_rejects_unknown_modes():
    with pytest.raises(ValueError, match="recompute_ffn entries must be True, False or one of"):
        SecViT('tiny', recompute_ffn='fc1')
    with pytest.raises(ValueError, match='one entry per stage'):
        SecViT('tiny', recompute_ffn=('all', 'all'))


def test_ddp_trains_a_backbone_that_omits_the_last_stage(tmp_path):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(SecViT('tiny', out_indices=(0, 1, 2)))
        for _ in range(2):  # an unused parameter fails the second step ("Expected to have finished reduction")
            sum(o.mean() for o in model(torch.randn(1, 3, 64, 64))).backward()
    finally:
        dist.destroy_process_group()
