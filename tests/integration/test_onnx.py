"""ONNX export of the backbone: onnxruntime computes what eager PyTorch does, the ranking is a TopK, and neither an
ATen fallback nor an mmsecvit kernel is left in the graph. The TorchScript exporter (mmdeploy's) is tested on
the tiny variant and a small one, torch.export's (``dynamo=True``) on a smaller one."""
import io

import onnx
import onnxruntime
import pytest
import torch

from mmsecvit import SecViT
from mmsecvit.ops import rope_angles, rope_tables
from mmsecvit.ops.attention import argsort_rows, semantic_order

from helpers import assert_float32_close

pytestmark = pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')

OPSET = 17
MIN_OPSET = 14  # the first with scaled_dot_product_attention
SIZES = ((64, 96), (96, 128))
SMALL_ARCH = dict(embed_dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
# Stage 1: 384 tokens in 19 clusters of 20 and one of 4; stage 2: 96 in 4 of 20 and one of 16; stage 3: 24 in
# 2 of 12; stage 4: global attention.
CLUSTER_SIZE = (20, 20, 20, -1)


def export_torchscript(module, *inputs, opset=OPSET):
    buffer = io.BytesIO()
    torch.onnx.export(module, inputs, buffer, dynamo=False, opset_version=opset)
    return buffer.getvalue()


def run_onnx(model_bytes, *inputs):
    session = onnxruntime.InferenceSession(model_bytes, providers=['CPUExecutionProvider'])
    feeds = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def assert_outputs_close(got, want):
    assert len(got) == len(want)
    for got_map, want_map in zip(got, want):
        assert_float32_close(got_map, want_map)


@pytest.fixture(scope='module')
def tiny_exports():
    """The tiny backbone, and for each of :data:`SIZES` its input, eager outputs and export (made with autograd
    on, as a plain ``torch.onnx.export`` call does)."""
    torch.manual_seed(0)
    model = SecViT(arch='tiny', drop_path_rate=0.0).eval()
    exports = {}
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            eager = model(x)
        exports[size] = x, eager, export_torchscript(model, x)
    return model, exports


@pytest.mark.parametrize('size', SIZES)
def test_exported_tiny_backbone_equals_eager(tiny_exports, size):
    x, eager, model_bytes = tiny_exports[1][size]
    assert_outputs_close(run_onnx(model_bytes, x), eager)


def test_export_leaves_the_model_unchanged(tiny_exports):
    model, exports = tiny_exports
    assert not model.training and all(p.requires_grad for p in model.parameters())
    for x, eager, _ in exports.values():
        with torch.no_grad():
            again = model(x)
        assert all(torch.equal(a, b) for a, b in zip(again, eager))


def test_exported_graph_ranks_by_topk_without_fallbacks(tiny_exports):
    proto = onnx.load_from_string(tiny_exports[1][SIZES[0]][2])
    onnx.checker.check_model(proto)
    op_types = [node.op_type for node in proto.graph.node]
    # One ranking per block with clusters: the tiny variant's 2 + 2 + 9 blocks of stages 1-3.
    assert op_types.count('TopK') == 13
    assert not {'ATen', 'PythonOp'} & set(op_types)
    assert {node.domain for node in proto.graph.node} <= {'', 'ai.onnx'}  # no custom (mmsecvit kernel) op


def test_exported_cluster_size_mode_equals_eager():
    model = SecViT(SMALL_ARCH, cluster_size=CLUSTER_SIZE, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():  # as mmdeploy exports
        eager = model(x)
        model_bytes = export_torchscript(model, x, opset=MIN_OPSET)
    assert_outputs_close(run_onnx(model_bytes, x), eager)


class _Ranking(torch.nn.Module):
    """:func:`semantic_order` of packed q/k/v with the rotary tables of a 10 x 12 map."""

    def __init__(self, head_dim):
        super().__init__()
        self.rope = rope_tables(10, 12, rope_angles(head_dim), head_dim ** -0.5)

    def forward(self, packed):
        return semantic_order(packed, self.rope)


class _Argsort(torch.nn.Module):
    def forward(self, scores):
        return argsort_rows(scores)


def test_exported_ranking_equals_eager():
    packed = torch.randn(2, 120, 3, 3, 16)
    ranking = _Ranking(16)
    (got,) = run_onnx(export_torchscript(ranking, packed), packed)
    assert torch.equal(got, ranking(packed))
    # TopK keeps equal scores in token order, as the eager stable argsort does.
    tied = torch.randint(0, 5, (2, 3, 64)).float()
    (got,) = run_onnx(export_torchscript(_Argsort(), tied), tied)
    assert torch.equal(got, tied.argsort(dim=-1, stable=True))


def test_torch_export_onnx_equals_eager():
    # Two stages (clusters, then global attention) keep torch.export's slower conversion short.
    model = SecViT(dict(embed_dims=(32, 64), depths=(1, 1), num_heads=(1, 2)), cluster_size=CLUSTER_SIZE[-2:],
                   out_indices=(0, 1), drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
    proto = torch.onnx.export(model, (x,), dynamo=True).model_proto
    assert 'TopK' in {node.op_type for node in proto.graph.node}
    assert_outputs_close(run_onnx(proto.SerializeToString(), x), eager)
