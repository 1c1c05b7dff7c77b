"""SEC attention: the cluster-attention kernel of each build and the chunked attention against PyTorch's fused
attention, the ranking kernel and the PyTorch ranking, forward and gradients."""
import pytest
import torch

from mmsecvit.ops import (
    apply_rope,
    dispatch,
    rope_angles,
    rope_tables,
    sec_attention,
    semantic_order,
    split_values,
    use_kernels,
)
from mmsecvit.ops.attention import argsort_rows

from helpers import assert_float32_close


@pytest.mark.parametrize('batch, tokens, heads, head_dim, cluster_len',
                         [(2, 1000, 4, 32, 98), (1, 999, 3, 32, 100), (2, 50, 2, 16, 7), (1, 300, 2, 16, 256),
                          (1, 17, 1, 32, 1)])
def test_cluster_attention_equals_fused_kernel(attention_impl, batch, tokens, heads, head_dim, cluster_len,
                                               monkeypatch):
    impl = attention_impl
    # A small chunk so that the chunked path runs several chunks, the shorter last cluster included.
    monkeypatch.setattr(dispatch, 'CHUNK_SCORES', 3 * cluster_len * cluster_len)
    packed = torch.randn(batch, tokens, heads, 3, head_dim)
    packed[:, :, :, 1] *= head_dim ** -0.5  # keys carry the softmax scale, as in the model
    packed.requires_grad_()
    grad = torch.randn(batch, tokens, heads * head_dim)
    results = []
    for name in (impl, 'fused'):
        out = sec_attention(packed, cluster_len, impl=name)
        results.append((out, *torch.autograd.grad(out, packed, grad)))
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize('batch, height, width, heads, head_dim, cluster_len',
                         [(2, 30, 33, 4, 32, 98), (1, 7, 11, 2, 16, 10), (1, 9, 8, 3, 32, 72)])
def test_attention_with_rope_tables_equals_rotating_first(attention_impl, batch, height, width, heads, head_dim,
                                                          cluster_len):
    # Given the rotary tables, the kernel rotates each cluster's copy of the rows and takes the rotation back
    # out of the gradient; the other paths rotate the packed tensor first. Both must equal the fused kernel on
    # rows rotated beforehand, gradients included.
    impl = attention_impl
    rope = rope_tables(height, width, rope_angles(head_dim), key_scale=head_dim ** -0.5)
    packed = torch.randn(batch, height * width, heads, 3, head_dim, requires_grad=True)
    grad = torch.randn(batch, height * width, heads * head_dim)
    out = sec_attention(packed, cluster_len, impl=impl, rope=rope)
    expected = sec_attention(apply_rope(packed, rope), cluster_len, impl='fused')
    assert (out - expected).abs().max() <= 1e-5
    for a, b in zip(torch.autograd.grad(out, packed, grad), torch.autograd.grad(expected, packed, grad)):
        assert (a - b).abs().max() <= 1e-5


def test_kernel_checks_its_rope_arguments(kernel):
    rows, sources = torch.randn(2 * 4 * 5 * 3, 96), torch.randperm(2 * 4 * 5 * 3)
    axes = rope_tables(4, 5, rope_angles(32)).axes
    assert kernel.cluster_attention_forward(rows, sources, [0, 12, 10], axes, 3, 4, 5, 0.5).shape == (120, 32)
    with pytest.raises(RuntimeError, match='height \\* width \\* heads'):
        kernel.cluster_attention_forward(rows, sources, [0, 12, 10], axes, 4, 4, 5, 0.5)
    with pytest.raises(RuntimeError, match='\\(height \\+ width, 2, head_dim / 2\\)'):
        kernel.cluster_attention_forward(rows, sources, [0, 12, 10], rope_tables(4, 6, rope_angles(32)).axes, 3, 4, 5,
                                         0.5)
    with pytest.raises(RuntimeError, match='\\(height \\+ width, 2, head_dim / 2\\)'):
        kernel.cluster_attention_backward(rows, sources, [0, 12, 10], torch.randn(120, 32),
                                          rope_tables(4, 5, rope_angles(16)).axes, 3, 4, 5, 0.5)
    with pytest.raises(RuntimeError, match='height \\* width must be the token count'):
        kernel.semantic_order(rows, 2, 20, 3, axes, 5, 5)


def test_kernel_checks_its_inputs(kernel):
    rows, sources = torch.randn(20, 96), torch.randperm(20)
    assert kernel.cluster_attention_forward(rows, sources, [0, 2, 10]).shape == (20, 32)
    with pytest.raises(RuntimeError, match='head_dim 16 or 32'):
        kernel.cluster_attention_forward(torch.randn(20, 48 * 3), sources, [0, 2, 10])
    with pytest.raises(RuntimeError, match='contiguous'):
        kernel.cluster_attention_forward(torch.randn(96, 20).t(), sources, [0, 2, 10])
    with pytest.raises(RuntimeError, match='cluster length'):
        kernel.cluster_attention_forward(torch.randn(300, 96), torch.randperm(300), [0, 1, 300])
    with pytest.raises(RuntimeError, match='past the rows'):
        kernel.cluster_attention_forward(rows, sources, [0, 3, 10])
    with pytest.raises(RuntimeError, match='cover every row'):
        kernel.cluster_attention_forward(rows, sources, [0, 1, 10])
    with pytest.raises(RuntimeError, match='follow each other'):
        kernel.cluster_attention_forward(rows, sources, [0, 1, 10, 12, 1, 8])
    with pytest.raises(ValueError, match='choose one of'):
        sec_attention(torch.randn(1, 20, 2, 3, 32), 10, impl='flash')


@pytest.mark.parametrize('used', ['both', 'rotated', 'values'])
def test_split_values_backward_equals_plain_autograd(used):
    rope = rope_tables(4, 5, rope_angles(8).double(), key_scale=8 ** -0.5)
    packed = torch.randn(2, 20, 3, 3, 8, dtype=torch.float64, requires_grad=True)
    kept, values = split_values(packed)
    rotated = apply_rope(kept, rope)  # as the attention's PyTorch paths use it
    assert values.shape == (2, 20, 24) and values.is_contiguous()
    plain_rotated = packed * rope.cos + packed.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * rope.sin
    plain_values = packed[:, :, :, 2].reshape(2, 20, 24)
    torch.testing.assert_close(rotated, plain_rotated)
    torch.testing.assert_close(values, plain_values, rtol=0, atol=0)
    weights = torch.randn_like(rotated), torch.randn_like(values)

    def loss(rotated, values):  # an output left out gets no gradient at all (None in the backward)
        terms = [(rotated * weights[0]).sum()] if used != 'values' else []
        return sum(terms + ([(values * weights[1]).sum()] if used != 'rotated' else []))

    (grad,) = torch.autograd.grad(loss(rotated, values), packed)
    (plain_grad,) = torch.autograd.grad(loss(plain_rotated, plain_values), packed)
    torch.testing.assert_close(grad, plain_grad)


@pytest.mark.parametrize('shape', [(2, 3, 5000), (1, 2, 70000)])
def test_radix_ranking_equals_argsort(shape):
    assert shape[-1] >= dispatch.RADIX_SORT_MIN_TOKENS  # the integer-key path
    scores = torch.randn(shape)
    scores[..., :300] = 0.0  # ties, and signed zeros
    scores[..., 300:400] = -0.0
    scores[..., 400:500] *= 1e-40  # subnormals of both signs
    scores[..., 500], scores[..., 501] = float('inf'), float('-inf')
    order = argsort_rows(scores)
    torch.testing.assert_close(scores.gather(-1, order), scores.sort(dim=-1).values, rtol=0, atol=0)
    assert torch.equal(order.sort(dim=-1).values, torch.arange(shape[-1]).expand(shape))


def exact_key_scores(packed):
    """Cosine of every key to the keys' sum, in float64: (B, heads, N)."""
    k = packed[:, :, :, 1].double()
    return torch.einsum('bnhd,bhd->bhn', k, k.sum(dim=1)) / k.norm(dim=-1).transpose(1, 2)


@pytest.mark.parametrize('batch, tokens, heads, head_dim', [(1, 67200, 2, 32), (2, 4200, 8, 32), (3, 49, 4, 16),
                                                            (1, 1, 2, 16)])
def test_ranking_kernel_sorts_by_the_exact_scores(kernel, batch, tokens, heads, head_dim):
    packed = torch.randn(batch, tokens, heads, 3, head_dim)
    order = kernel.semantic_order(packed.reshape(-1, 3 * head_dim), batch, tokens, heads)
    assert torch.equal(order.sort(dim=-1).values, torch.arange(tokens).expand(batch, heads, tokens))
    ranked = exact_key_scores(packed).gather(-1, order)
    # Ranked within float32 rounding of the scores (whose scale is the centre's length, not 1).
    scale = packed[:, :, :, 1].double().sum(dim=1).norm(dim=-1)[..., None]
    assert ((ranked[..., :-1] - ranked[..., 1:]) / scale <= 1e-6).all()
    # The same ranking as the PyTorch path's.
    with use_kernels(False):
        assert torch.equal(order, semantic_order(packed))


@pytest.mark.parametrize('offset', [0.0, 3.0])
def test_every_path_ranks_the_same_keys_alike(offset):
    # Stage 1 at 800x1344 (67,200 tokens), keys with and without a common offset (as a trained qkv bias
    # gives): the PyTorch path, each kernel build, and 1 or 2 threads give the same clusters.
    packed = torch.randn(1, 67200, 2, 3, 32)
    packed[:, :, :, 1] += offset
    with use_kernels(False):
        expected = semantic_order(packed)
    threads = torch.get_num_threads()
    try:
        for isa in dispatch.cpu_isas():
            for count in (1, 2):
                torch.set_num_threads(count)
                with use_kernels(isa=isa):
                    assert torch.equal(semantic_order(packed), expected), (isa, count)
                with use_kernels(False):
                    assert torch.equal(semantic_order(packed), expected), ('pytorch', count)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize('batch, height, width, heads, head_dim', [(1, 200, 336, 2, 32), (2, 7, 9, 4, 16)])
def test_ranking_kernel_rotates_the_keys_it_is_given_unrotated(kernel, batch, height, width, heads, head_dim):
    rope = rope_tables(height, width, rope_angles(head_dim), key_scale=head_dim ** -0.5)
    packed = torch.randn(batch, height * width, heads, 3, head_dim)
    rows = packed.reshape(-1, 3 * head_dim)
    order = kernel.semantic_order(rows, batch, height * width, heads, rope.axes, height, width)
    rotated = apply_rope(packed.clone(), rope)
    ranked = exact_key_scores(rotated).gather(-1, order)
    scale = rotated[:, :, :, 1].double().sum(dim=1).norm(dim=-1)[..., None]
    assert ((ranked[..., :-1] - ranked[..., 1:]) / scale <= 1e-6).all()
    unrotated_order = kernel.semantic_order(rows, batch, height * width, heads)
    assert (order != unrotated_order).float().mean() > 0.5  # the rotation matters


def test_ranking_kernel_keeps_token_order_between_equal_scores(kernel):
    packed = torch.randn(1, 50, 2, 3, 16)
    packed[:, 10:20, :, 1] = packed[:, 5:6, :, 1]  # eleven equal keys
    order = kernel.semantic_order(packed.reshape(-1, 48), 1, 50, 2)
    for row in order[0]:
        tied = row[(row >= 10) & (row < 20) | (row == 5)]
        assert torch.equal(tied, tied.sort().values)


def test_ranking_kernel_checks_its_inputs(kernel):
    rows = torch.randn(2 * 7 * 3, 96)
    with pytest.raises(RuntimeError, match='batch \\* tokens \\* heads rows'):
        kernel.semantic_order(rows, 2, 7, 4)
    with pytest.raises(RuntimeError, match='head_dim 16 or 32'):
        kernel.semantic_order(torch.randn(42, 24), 2, 7, 3)
    with pytest.raises(RuntimeError, match='contiguous'):
        kernel.semantic_order(rows.t(), 2, 7, 3)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_keys_rank_as_their_float32_values(dtype):
    # A common key offset (as a trained qkv bias gives) makes half-precision scores overflow or round to
    # ties; the ranking is computed in float64 from the same keys whatever the dtype and autocast state.
    packed = torch.randn(1, 4200, 2, 3, 32)
    packed[:, :, :, 1] += 2.0
    keys = packed.to(dtype)
    expected = semantic_order(keys.float())
    with torch.autocast('cpu', dtype=dtype):
        assert torch.equal(semantic_order(keys), expected)
    assert torch.equal(semantic_order(keys), expected)


def test_attention_kernel_rejects_sources_outside_the_rows(kernel):
    rows = torch.randn(20, 96)
    for bad in (-3, 20):
        sources = torch.randperm(20)
        sources[4] = bad
        with pytest.raises(RuntimeError, match='sources'):
            kernel.cluster_attention_forward(rows, sources, [0, 2, 10])
        with pytest.raises(RuntimeError, match='sources'):
            kernel.cluster_attention_backward(rows, sources, [0, 2, 10], torch.randn(20, 32))


def test_random_shapes_agree_between_the_kernels_and_the_pytorch_path():
    # A seeded sweep: odd and prime maps, 1-3 images, head sizes 16 and 32, cluster lengths that do and do
    # not divide the tokens; each kernel build against the chunked PyTorch attention, forward and gradients.
    generator = torch.Generator().manual_seed(20)
    cases = 0
    for _ in range(12):
        height, width = (int(v) for v in torch.randint(3, 40, (2,), generator=generator))
        batch = int(torch.randint(1, 4, (1,), generator=generator))
        heads = int(torch.randint(1, 5, (1,), generator=generator))
        head_dim = (16, 32)[int(torch.randint(0, 2, (1,), generator=generator))]
        tokens = height * width
        cluster_len = int(torch.randint(1, min(tokens, 256) + 1, (1,), generator=generator))
        rope = rope_tables(height, width, rope_angles(head_dim), key_scale=head_dim ** -0.5)
        packed = torch.randn(batch, tokens, heads, 3, head_dim, generator=generator).requires_grad_()
        grad = torch.randn(batch, tokens, heads * head_dim, generator=generator)
        with use_kernels(False):
            expected = sec_attention(packed, cluster_len, impl='chunked', rope=rope)
            (expected_grad,) = torch.autograd.grad(expected, packed, grad)
        for isa in dispatch.cpu_isas():
            with use_kernels(isa=isa):
                out = sec_attention(packed, cluster_len, impl='kernel', rope=rope)
                (got_grad,) = torch.autograd.grad(out, packed, grad)
            assert_float32_close(out, expected.double(), terms=cluster_len)
            assert_float32_close(got_grad, expected_grad.double(), terms=cluster_len)
            cases += 1
    assert cases == 12 * len(dispatch.cpu_isas())
