"""torch.compile and torch.export of the backbone: no graph breaks, the compiled kernels traced as custom ops,
and results equal to eager."""
import torch

from mmsecvit import SecViT

from helpers import assert_float32_close

# One block per stage: compiling stays quick, and every op of the model is still traced.
SMALL_ARCH = dict(embed_dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


def small_model():
    return SecViT(SMALL_ARCH, cluster_size=16, drop_path_rate=0.0)


def test_backbone_traces_without_graph_breaks(backend):
    model = small_model()
    x = torch.randn(1, 3, 64, 96)
    for training in (False, True):
        model.train(training)
        torch._dynamo.reset()
        with torch.set_grad_enabled(training):
            explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        ops = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
        assert any('mmsecvit.cluster_attention' in op for op in ops) == (backend != 'pytorch')


def test_inductor_inference_equals_eager(backend):
    model = small_model().eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(x)
    for got, want in zip(compiled, expected):
        assert_float32_close(got, want.double(), terms=256)


def test_compiled_training_step_equals_eager():
    # AOT autograd traces forward and backward with dynamic shapes (the kernels' fake implementations and
    # autograd formulas, where a kernel build runs); the gradients equal eager's.
    model = small_model().train()
    x = torch.randn(2, 3, 64, 96)

    def gradients(forward):
        model.zero_grad()
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in forward(x)).backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = gradients(model)
    torch._dynamo.reset()
    got = gradients(torch.compile(model, backend='aot_eager', fullgraph=True, dynamic=True))
    for a, b in zip(got, expected):
        assert_float32_close(a, b.double(), terms=2 * 64 * 96)


def test_export_for_a_fixed_size_equals_eager(backend):
    model = small_model().eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,), strict=False)
    for got, want in zip(exported.module()(x), expected):
        assert_float32_close(got, want.double(), terms=256)
