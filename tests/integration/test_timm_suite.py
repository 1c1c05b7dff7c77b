"""timm's model tests (``tests/test_models.py`` of timm 1.0.31) for ``secvit_tiny``: the same timm APIs and
assertions, written here rather than vendored.

Input sizes are the suite's (its per-test targets cap the 224 px config size: 128 for backward and fx, 96 for
features), except that ``test_default_cfgs`` on the CPU (the suite runs it on the meta device) takes 128 px.
TorchScript is not supported (see docs), so the suite's two TorchScript tests have no counterpart here.
"""
import copy
import inspect
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import mmsecvit  # noqa: F401 (registers the secvit_* models)

MODEL = 'secvit_tiny'
CFG_SIZE = timm.get_pretrained_cfg_value(MODEL, 'input_size')


def input_size(target=None):
    """The suite's ``_get_input_size``: the config's (C, H, W), H and W capped at ``target``."""
    return CFG_SIZE if target is None else (CFG_SIZE[0],) + tuple(min(s, target) for s in CFG_SIZE[1:])


def create_fx_model(model, train=False):
    """The suite's ``_create_fx_model``: trace with timm's leaf modules and functions, return the output node(s)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return_nodes = [train_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**tracer_kwargs).trace(model).nodes))
        output_names = [n.name for n in graph_nodes[0]._input_nodes]
        node_names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-node_names.index(name)] for name in output_names]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def test_forward():
    model = timm.create_model(MODEL).eval()
    inputs = torch.randn(1, *input_size())
    outputs = model(inputs)
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(inputs), outputs, rtol=1e-4, atol=1e-5)


def test_backward():
    model = timm.create_model(MODEL, num_classes=42).train()
    outputs = model(torch.randn(2, *input_size(128)))
    outputs.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()


def assert_api_contract(model, device):
    """The suite's ``_assert_model_api_contract``."""
    with pytest.raises(TypeError):
        timm.create_model(MODEL, device=device, not_a_model_arg=1)
    assert inspect.signature(model.reset_classifier).parameters['global_pool'].default is None


def assert_reset_classifier_follows_model(model):
    """The suite's ``_assert_reset_classifier_preserves_parent_device_dtype``."""
    model.to(device='meta', dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    parameters = list(model.get_classifier().parameters())
    assert parameters and all(p.device.type == 'meta' and p.dtype == torch.float64 for p in parameters)
    assert all(module.training == model.training for module in model.modules())


def assert_factory_device_and_frozen(device):
    """The suite's ``_assert_factory_device`` and ``_assert_frozen_survives_reset_and_resize``."""
    model = timm.create_model(MODEL, device=device, dtype=torch.float32)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert [n for n, t in tensors if t.device != torch.device(device)] == []
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, '')
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []


@pytest.mark.parametrize('device', ['cpu', 'meta'])
def test_default_cfgs(device):
    with torch.device(device):
        model = timm.create_model(MODEL, device=device, dtype=torch.float32).eval()
    assert_api_contract(model, device)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert model.in_chans == cfg['input_size'][0]
    assert cfg['classifier'] + '.weight' in state_dict and cfg['first_conv'] + '.weight' in state_dict
    # On the CPU 128 px inputs save time; the config's pool_size is the map size at its 224 px input_size.
    size = cfg['input_size'] if device == 'meta' else input_size(128)
    assert cfg['pool_size'] == tuple(s // 32 for s in cfg['input_size'][1:])
    pool_size = tuple(math.ceil(s / 32) for s in size[1:])
    spatial_axis, feat_axis = get_spatial_dim('NCHW'), get_channel_dim('NCHW')
    inputs = torch.randn(1, *size, device=device)

    features = model.forward_features(inputs)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert tuple(features.shape[i] for i in spatial_axis) == pool_size
    assert features.shape[feat_axis] == model.num_features
    assert pre_logits.shape[1] == model.head_hidden_size
    model.to(torch.bfloat16)
    assert model(inputs.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model(inputs)
    assert outputs.shape == pre_logits.shape and outputs.shape[1] == model.head_hidden_size
    model.reset_classifier(0, '')
    outputs = model(inputs)
    assert outputs.ndim == 4 and tuple(outputs.shape[i] for i in spatial_axis) == pool_size

    model = timm.create_model(MODEL, num_classes=0, device=device, dtype=torch.float32).eval()
    outputs = model(inputs)
    assert outputs.shape == pre_logits.shape and outputs.shape[1] == model.head_hidden_size
    model = timm.create_model(MODEL, num_classes=0, global_pool='', device=device, dtype=torch.float32).eval()
    outputs = model(inputs)
    assert outputs.ndim == 4 and tuple(outputs.shape[i] for i in spatial_axis) == pool_size
    assert_reset_classifier_follows_model(model)
    assert_factory_device_and_frozen(device)


def assert_feature_maps(outputs, feature_info, size, check_lower_bound=True):
    """Channels, batch and spatial size of each map against its feature info (the suite's checks)."""
    assert len(outputs) == len(feature_info.channels()) >= 3
    for channels, reduction, output in zip(feature_info.channels(), feature_info.reduction(), outputs):
        assert output.shape[0] == 1 and output.shape[1] == channels and not torch.isnan(output).any()
        for axis, length in zip(get_spatial_dim('NCHW'), size):
            assert output.shape[axis] <= math.ceil(length / reduction) + 1
            if check_lower_bound:
                assert output.shape[axis] > length / (2 * reduction), f'feature reduction {reduction} too small'


@pytest.mark.parametrize('feature_cls', [None, 'getter'])
def test_forward_features(feature_cls):
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = timm.create_model(MODEL, features_only=True, **kwargs).eval()
    size = input_size(96)
    outputs = model(torch.randn(1, *size))
    assert_feature_maps(outputs, model.feature_info, size[1:], check_lower_bound=feature_cls is None)


def test_forward_intermediates():
    model = timm.create_model(MODEL).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    size = input_size(96)
    inputs = torch.randn(1, *size)
    output, intermediates = model.forward_intermediates(inputs, output_fmt='NCHW')
    assert_feature_maps(intermediates, feature_info, size[1:], check_lower_bound=False)
    torch.testing.assert_close(output, model.forward_features(inputs), rtol=1e-5, atol=1e-8)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(inputs, output_fmt='NCHW')[0], output, rtol=1e-4,
                               atol=1e-5)


def test_prune_intermediate_layers_contract():
    model = timm.create_model(MODEL).eval()
    x = torch.randn(2, *input_size(96))
    last = len(model.feature_info) - 1
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([last], prune_head=False)
        torch.testing.assert_close(pruned(x), expected)

    for i in range(last + 1):
        with torch.no_grad():
            selected = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(selected[0], taps[i])
            pruned = copy.deepcopy(model)
            take_indices = pruned.prune_intermediate_layers([i])
            selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
            torch.testing.assert_close(selected[0], taps[i])
            pruned = copy.deepcopy(model)
            take_indices = pruned.prune_intermediate_layers([i], prune_norm=True)
            torch.testing.assert_close(pruned.forward_features(x), taps[i])
        pruned.train()
        selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
        sum(f.sum() for f in selected + [pruned.forward_features(x)]).backward()
        assert [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None] == []


def test_forward_fx():
    model = timm.create_model(MODEL).eval()
    with torch.inference_mode():
        inputs = torch.randn(1, *input_size(128))
        outputs = model(inputs)
        fx_outputs = torch.cat(tuple(create_fx_model(model)(inputs).values()))
        torch.testing.assert_close(fx_outputs, outputs, rtol=1e-4, atol=1e-5)
        assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()

        # timm's fx feature extraction stops at the leaf blocks: the last block of a stage gives its (B, H, W, C) map.
        nodes = [f'backbone.stages.{i}.blocks.{len(stage.blocks) - 1}' for i, stage in enumerate(model.backbone.stages)]
        extracted = timm.models.create_feature_extractor(model, nodes)(inputs)
        for node, tap in zip(nodes, model.forward_intermediates(inputs, intermediates_only=True)):
            torch.testing.assert_close(extracted[node].permute(0, 3, 1, 2), tap)


def test_backward_fx():
    model = timm.create_model(MODEL, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    model = create_fx_model(model, train=True)
    outputs = torch.cat(tuple(model(torch.randn(2, *input_size(128))).values()))
    outputs.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()
