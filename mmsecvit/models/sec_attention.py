"""Semantic Equitable Clustering (SEC) attention and the 2-D rotary position embedding it uses.

Per image and per head, the keys are averaged into one centre, every token is ranked by the cosine
similarity of its key to that centre (a single argsort), the ranked sequence is cut into clusters of
equal length, attention runs inside each cluster and the result is put back in the original order.

When the token count is not a multiple of the cluster length, the last cluster is shorter: it holds
only real tokens, so nothing is padded, no padded token shifts the centre and none is attended to.

Layout used for speed: q, k and v of one (token, head) pair are stored as one row of ``3 * head_dim``
values (a "packed" tensor of shape (B, N, heads, 3, head_dim)). Every head's tokens in cluster order are
then a list of row indices, and each cluster a consecutive run of that list. Given the rotary tables, the
compiled kernels take the rows before the rotary embedding and apply it themselves (to each cluster's copy
of the rows); the other implementations rotate the packed tensor first.

Three implementations of the attention inside clusters (:func:`attention_impl` picks one):

- ``'kernel'``: the compiled CPU kernel (``mmsecvit/csrc/cluster_attention.cpp``, float32, AVX-512). It
  reads each cluster's rows through the index list (rotating q and k in its copy of them) and writes every
  result row straight to its place in (B, N, heads * head_dim) order, so no permuted or rotated copy of the
  rows is made.
- ``'chunked'``: the rows permuted into cluster order (``index_select`` of contiguous rows, whose gradient is
  the inverse permutation), batched matrix products over cache-sized chunks of clusters
  (:class:`_ClusterAttention`), and the inverse permutation back.
- ``'fused'``: the same permutations around PyTorch's fused attention over a 4-D batch (GPU, autocast,
  and global attention).
"""
import functools
import math

import torch
import torch.nn.functional as F

from .compiled import _kernels, kernel_available

IMPLEMENTATIONS = ('kernel', 'chunked', 'fused')


def cluster_length(num_tokens, num_clusters=-1, cluster_size=-1):
    """Length of each cluster for a sequence of ``num_tokens`` tokens.

    Exactly one of the two settings decides; a value <= 0 (or a single cluster) means global attention,
    which is returned as ``num_tokens``.

    Args:
        num_tokens (int): Tokens in the sequence (H * W of the feature map).
        num_clusters (int): Fixed number of clusters (the official behaviour). Clusters are
            ``ceil(num_tokens / num_clusters)`` long, so there are at most ``num_clusters`` of them.
            Used when ``cluster_size <= 0``.
        cluster_size (int): Fixed maximum tokens per cluster: the cluster count grows with the image
            (``ceil(num_tokens / cluster_size)``) and the tokens are shared out evenly between them,
            so cost stays linear in the token count.

    Returns:
        int: The cluster length, between 1 and ``num_tokens``.
    """
    if cluster_size > 0:
        num_clusters = math.ceil(num_tokens / cluster_size)
    if num_clusters <= 1:
        return num_tokens
    return math.ceil(num_tokens / min(num_clusters, num_tokens))


# From this many tokens per head, float32 CPU rankings use one radix sort of integer keys (see argsort_rows).
RADIX_SORT_MIN_TOKENS = 4096


def _kernel_fits(packed):
    """Whether the compiled kernels (ranking, cluster attention) take this packed q/k/v: float32 on a CPU
    they can run on, head_dim 16 or 32, outside traced graphs."""
    return (packed.device.type == 'cpu' and packed.dtype == torch.float32 and packed.shape[-1] in (16, 32)
            and not torch.jit.is_tracing() and kernel_available())


@torch.no_grad()
def semantic_order(packed, rope=None):
    """Rank each head's tokens by the cosine similarity of their key to the mean key (ascending).

    The centre is the keys' sum: its length, a positive factor per head, does not change the ranking.

    Float32 CPU input with head_dim 16 or 32 is ranked by the compiled kernel (``semantic_order.cpp``: one
    pass to sum the keys in float64, one to score them, a radix sort per image and head; 4-8x faster than
    the PyTorch ops below on this model's maps), outside traced graphs.

    Args:
        packed (Tensor): Packed q, k, v of shape (B, N, heads, 3, head_dim).
        rope (RotaryTables | None): If given, the keys are not rotated yet and are ranked rotated.

    Returns:
        Tensor: Token indices of shape (B, heads, N).
    """
    batch, num_tokens, heads, _, head_dim = packed.shape
    if _kernel_fits(packed):
        rows = packed.reshape(-1, 3 * head_dim).contiguous()
        if rope is None:
            return _kernels.semantic_order(rows, batch, num_tokens, heads)
        return _kernels.semantic_order(rows, batch, num_tokens, heads, rope.axes, rope.height, rope.width)
    if rope is not None:
        packed = apply_rope(packed.clone(), rope)  # without autograd: rotates the copy in place
    k = packed[:, :, :, 1]
    dots = torch.einsum('bnhd,bhd->bhn', k, k.sum(dim=1))
    norms = torch.linalg.vector_norm(k, dim=-1).transpose(1, 2)
    return argsort_rows(dots / norms.clamp_min(1e-12))


def argsort_rows(scores):
    """``scores.argsort(dim=-1)`` of a (B, heads, N) tensor.

    On the CPU, float32 rows of at least ``RADIX_SORT_MIN_TOKENS`` are ranked by one sort of 64-bit
    integer keys, ``row << 32 | order-preserving bits of the score``, which PyTorch radix-sorts across
    threads: 2.5x faster than the comparison sort of the rows at 67200 tokens. Traced graphs (FLOP
    counting) keep ``argsort``.
    """
    num_tokens = scores.shape[-1]
    if (scores.device.type != 'cpu' or scores.dtype != torch.float32 or num_tokens < RADIX_SORT_MIN_TOKENS
            or torch.jit.is_tracing()):
        return scores.argsort(dim=-1)
    bits = scores.contiguous().view(torch.int32).to(torch.int64)
    # Negative floats order by decreasing magnitude: flipping their magnitude bits makes the signed
    # integers order like the floats; the offset then makes every key non-negative.
    keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) + 2 ** 31
    rows = torch.arange(scores.shape[0] * scores.shape[1], device=scores.device).view(scores.shape[:2] + (1,))
    flat = (keys + (rows << 32)).flatten().sort().indices.view(scores.shape)
    return flat - rows * num_tokens


def cluster_assignment(packed, cluster_len, rope=None):
    """Cluster index of every token, in the original token order.

    Args:
        packed (Tensor): Packed q, k, v of shape (B, N, heads, 3, head_dim).
        cluster_len (int): Tokens per cluster; ``>= N`` puts every token in cluster 0.
        rope (RotaryTables | None): If given, q and k are not rotated yet (see :func:`sec_attention`).

    Returns:
        Tensor: Shape (B, heads, N), values in ``[0, ceil(N / cluster_len))``.
    """
    batch, num_tokens, heads = packed.shape[:3]
    if cluster_len >= num_tokens:
        return torch.zeros(batch, heads, num_tokens, dtype=torch.long, device=packed.device)
    order = semantic_order(packed, rope)
    rank_cluster = (torch.arange(num_tokens, device=packed.device) // cluster_len).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, rank_cluster)


class _PermuteRows(torch.autograd.Function):
    """``rows[index]`` for a permutation ``index``; the gradient is the inverse permutation."""

    @staticmethod
    def forward(ctx, rows, index, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def cluster_slot_sources(order, split):
    """Which packed row fills each slot of the clustered layout.

    Packed rows are numbered ``(b * N + token) * heads + head``. Slots hold, first, the ``split`` leading
    ranked tokens of every (image, head) (the full clusters), then the remaining shorter cluster of every
    (image, head), so both parts are contiguous batches.

    Args:
        order (Tensor): Ranked token indices, shape (B, heads, N).
        split (int): Tokens in full clusters per (image, head).

    Returns:
        Tensor: Shape (B * heads * N,), a permutation of the packed row indices.
    """
    batch, heads, num_tokens = order.shape
    images = torch.arange(batch, device=order.device)[:, None, None]
    head_ids = torch.arange(heads, device=order.device)[None, :, None]
    rows = (images * num_tokens + order) * heads + head_ids
    if split == num_tokens:
        return rows.flatten()
    return torch.cat([rows[..., :split].flatten(), rows[..., split:].flatten()])


def attend(q, k, v):
    """Softmax attention with scores ``q @ k^T`` (``k`` carries the scale)."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


# Scores held at once by the chunked CPU attention (float32: 1 MiB, about L2-cache sized).
CHUNK_SCORES = 2 ** 18
# Longer clusters (e.g. global attention) go to the fused kernel, which is faster there; also the compiled
# kernel's limit (kMaxCluster in mmsecvit/csrc/cluster_attention.cpp).
MAX_CHUNKED_CLUSTER = 256


def _chunks(parts):
    """Yield (first row, clusters, cluster length) pieces of ``parts`` sized to hold ~CHUNK_SCORES scores."""
    for start, count, length in parts:
        step = max(1, CHUNK_SCORES // (length * length))
        for first in range(0, count, step):
            num = min(step, count - first)
            yield start + first * length, num, length


def _cluster_qkv(slots, first, num, length):
    """q, k, v views (num, length, head_dim) of consecutive clusters in ``slots`` (rows, 3, head_dim)."""
    return slots[first:first + num * length].view(num, length, 3, -1).unbind(2)


def _cluster_probs(q, k):
    """Softmax attention probabilities of a chunk of clusters (``k`` carries the scale)."""
    return torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)


class _ClusterAttention(torch.autograd.Function):
    """Attention inside consecutive clusters of packed rows, a cache-sized chunk of clusters at a time.

    The backward recomputes each chunk's probabilities instead of storing them (they would take
    ``length`` times the memory of the input), as the fused kernels do.
    """

    @staticmethod
    def forward(ctx, slots, parts):
        out = slots.new_empty(slots.shape[0], slots.shape[2])
        for first, num, length in _chunks(parts):
            q, k, v = _cluster_qkv(slots, first, num, length)
            probs = _cluster_probs(q, k)
            torch.bmm(probs, v, out=out[first:first + num * length].view(num, length, -1))
        ctx.save_for_backward(slots)
        ctx.parts = parts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (slots,) = ctx.saved_tensors
        grad = torch.empty_like(slots)
        for first, num, length in _chunks(ctx.parts):
            q, k, v = _cluster_qkv(slots, first, num, length)
            grad_q, grad_k, grad_v = _cluster_qkv(grad, first, num, length)
            grad_o = grad_out[first:first + num * length].view(num, length, -1)
            probs = _cluster_probs(q, k)
            grad_v.copy_(torch.bmm(probs.transpose(1, 2), grad_o))
            grad_scores = torch._softmax_backward_data(torch.bmm(grad_o, v.transpose(1, 2)), probs, -1, probs.dtype)
            grad_q.copy_(torch.bmm(grad_scores, k))
            grad_k.copy_(torch.bmm(grad_scores.transpose(1, 2), q))
        return grad, None


class _KernelClusterAttention(torch.autograd.Function):
    """The compiled kernel: attention inside the clusters listed by ``sources``, straight from and to packed
    rows in token order, the rows' q and k rotated by the kernel where ``rope`` (the kernels' rotary
    arguments, see :meth:`RotaryTables.kernel_args`) is not empty. Backward recomputes each cluster's
    probabilities, as :class:`_ClusterAttention` does."""

    @staticmethod
    def forward(ctx, rows, sources, parts, rope):
        ctx.save_for_backward(rows, sources)
        ctx.parts, ctx.rope = parts, rope
        return _kernels.forward(rows, sources, parts, *rope)

    @staticmethod
    def backward(ctx, grad_out):
        rows, sources = ctx.saved_tensors
        return _kernels.backward(rows, sources, ctx.parts, grad_out.contiguous(), *ctx.rope), None, None, None


def attention_impl(packed, cluster_len):
    """The fastest implementation for these clusters.

    On the CPU, float32 clusters of up to MAX_CHUNKED_CLUSTER tokens outside autocast go to the compiled
    kernel when it is available and head_dim is 16 or 32, otherwise to the chunked attention (float64
    too); everything else (GPU, autocast, long clusters, traced graphs for FLOP counting and export) to
    PyTorch's fused kernel.
    """
    if (packed.device.type != 'cpu' or torch.is_autocast_enabled('cpu') or cluster_len > MAX_CHUNKED_CLUSTER
            or torch.jit.is_tracing()):
        return 'fused'
    if _kernel_fits(packed):
        return 'kernel'
    return 'chunked' if packed.dtype in (torch.float32, torch.float64) else 'fused'


def sec_attention(packed, cluster_len, impl=None, rope=None):
    """SEC attention on packed q, k, v.

    Args:
        packed (Tensor): Shape (B, N, heads, 3, head_dim): q and k with rotary embedding, k scaled by
            ``head_dim ** -0.5``, and v; or, with ``rope``, q and k before both.
        cluster_len (int): Tokens per cluster; ``>= N`` means global attention.
        impl (str | None): ``'kernel'``, ``'chunked'`` or ``'fused'`` (see the module docstring); None picks
            the fastest for the input (:func:`attention_impl`). Global attention always uses the fused kernel.
        rope (RotaryTables | None): Rotary tables of the map (:func:`rope_tables`) when ``packed`` is not
            rotated yet: the compiled kernel rotates each cluster's copy of the rows, the other implementations
            rotate ``packed`` first (:func:`apply_rope`).

    Returns:
        Tensor: Shape (B, N, heads * head_dim), in the original token order.
    """
    batch, num_tokens, heads, _, head_dim = packed.shape
    global_attention = cluster_len >= num_tokens
    if not global_attention:
        impl = attention_impl(packed, cluster_len) if impl is None else impl
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f'Unknown SEC attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}')
        if impl == 'kernel' and not kernel_available():
            raise RuntimeError('The compiled cluster-attention kernel is not available (mmsecvit._kernels is not '
                               'built, or this CPU lacks AVX-512); use impl="chunked" or "fused"')
    if rope is not None and (global_attention or impl != 'kernel'):
        packed, rope = apply_rope(packed, rope), None
    if global_attention:
        q, k, v = (packed[:, :, :, i].transpose(1, 2) for i in range(3))
        return attend(q, k, v).transpose(1, 2).reshape(batch, num_tokens, heads * head_dim)

    num_full = num_tokens // cluster_len
    split = num_full * cluster_len
    groups = batch * heads
    sources = cluster_slot_sources(semantic_order(packed, rope), split)
    parts = [(0, groups * num_full, cluster_len)]
    if split < num_tokens:
        parts.append((groups * split, groups, num_tokens - split))
    if impl == 'kernel':
        rows = packed.reshape(-1, 3 * head_dim).contiguous()
        out = _KernelClusterAttention.apply(rows, sources, [value for part in parts for value in part],
                                            () if rope is None else rope.kernel_args(heads))
        return out.view(batch, num_tokens, heads * head_dim)

    inverse = torch.empty_like(sources).scatter_(0, sources, torch.arange(len(sources), device=sources.device))
    slots = _PermuteRows.apply(packed.reshape(-1, 3 * head_dim), sources, inverse).view(-1, 3, head_dim)
    if impl == 'chunked':
        out = _ClusterAttention.apply(slots, parts)
    else:
        # 4-D (image-head, cluster, token, channel) batches, the layout the GPU's fused kernels take.
        batches = ([t.unflatten(0, (groups, -1)) for t in _cluster_qkv(slots, *part)] for part in parts)
        out = torch.cat([attend(q, k, v).reshape(-1, head_dim) for q, k, v in batches])
    return _PermuteRows.apply(out, inverse, sources).view(batch, num_tokens, heads * head_dim)


def rope_angles(head_dim, device=None):
    """Rotation frequencies of the 2-D rotary embedding: ``head_dim // 4`` values, each used twice.

    Returns:
        Tensor: Shape (head_dim // 2,), values ``1 / 10000 ** linspace(0, 1, head_dim // 4)`` interleaved.
    """
    if head_dim % 4:
        raise ValueError(f'2-D rotary embedding needs head_dim divisible by 4, got {head_dim}')
    angle = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4, device=device)
    return angle.repeat_interleave(2)


class RotaryTables:
    """Rotations of q and k (2-D rotary embedding, keys also scaled) for every token of an ``height x width``
    map, built when first needed (:func:`rope_tables`).

    The first half of the channel pairs rotate with the row index, the second half with the column index,
    so the sines and cosines are computed per row and per column.

    Attributes:
        complex (Tensor): cos + i sin per token for q (index 0), k (index 1, times the key scale) and v
            (index 2, identity), shape (N, 1, 3, head_dim // 2): it broadcasts over packed (B, N, heads, 3,
            pairs). For the PyTorch paths; ``cos`` and ``sin`` are its real and imaginary views.
        axes (Tensor): For the compiled kernels (float32): per row index, then per column index, the cosine
            of each channel's pair and the signed sine (-sin, sin) of each pair, shape
            (height + width, 2, head_dim // 2).
    """

    def __init__(self, height, width, angle, key_scale=1.0):
        self.height, self.width, self.key_scale = height, width, key_scale
        half = angle[::2]  # one frequency per rotated pair

        def rotations(length):
            theta = torch.arange(length, device=angle.device, dtype=angle.dtype)[:, None] * half
            return torch.polar(torch.ones_like(theta), theta)

        self._by_row, self._by_column = rotations(height), rotations(width)

    @functools.cached_property
    def complex(self):
        rows, cols, height, width = self._by_row, self._by_column, self.height, self.width
        rotation = rows.new_empty(height, width, 3, 2 * rows.shape[-1])
        rotation[:, :, 0] = torch.cat([rows[:, None, :].expand(-1, width, -1), cols[None].expand(height, -1, -1)], -1)
        torch.mul(rotation[:, :, 0], self.key_scale, out=rotation[:, :, 1])
        rotation[:, :, 2] = 1
        return rotation.view(height * width, 1, 3, -1)

    @property
    def cos(self):
        return self.complex.real

    @property
    def sin(self):
        return self.complex.imag

    @functools.cached_property
    def axes(self):
        both = torch.cat([self._by_row, self._by_column])
        cos = both.real.repeat_interleave(2, dim=-1)
        sin = torch.stack([-both.imag, both.imag], dim=-1).flatten(-2)
        return torch.stack([cos, sin], dim=1).float().contiguous()

    def kernel_args(self, heads):
        """The compiled attention kernels' rotary arguments for packed rows of ``heads`` heads."""
        return self.axes, heads, self.height, self.width, self.key_scale


def rope_tables(height, width, angle, key_scale=1.0):
    """Rotations of q and k for every token of an ``height x width`` map (v is left unrotated).

    Args:
        height, width (int): Feature map size.
        angle (Tensor): Output of :func:`rope_angles`, shape (head_dim // 2,).
        key_scale (float): Factor folded into the key rotation (``head_dim ** -0.5``).

    Returns:
        RotaryTables: the tables, each computed when first used.
    """
    return RotaryTables(height, width, angle, key_scale)


def _rotate(packed, rotation):
    """``packed`` with adjacent channel pairs multiplied by the complex ``rotation`` (a new tensor)."""
    return torch.view_as_real(torch.view_as_complex(packed.unflatten(-1, (-1, 2))) * rotation).flatten(-2)


def _copy_values(packed):
    """v of packed (B, N, heads, 3, head_dim) as a new contiguous (B, N, heads * head_dim) tensor."""
    return packed[:, :, :, 2].clone(memory_format=torch.contiguous_format).flatten(2)


class _SplitValues(torch.autograd.Function):
    """Packed q/k/v passed on, and a contiguous copy of v, with one backward.

    v feeds both the attention (through the packed tensor) and the LePE branch (through the copy). Plain
    autograd would give the copy's gradient a packed-size zero tensor and then add the two packed-size
    gradients; here it is added into v's slice of the packed gradient in place. That gradient is the
    attention's own new tensor (from the compiled kernel, the inverse permutation or the rotary embedding's
    backward), which nothing else reads.
    """

    @staticmethod
    def forward(ctx, packed):
        ctx.packed_shape = packed.shape
        return packed, _copy_values(packed)

    @staticmethod
    def backward(ctx, grad_packed, grad_values):
        grad = grad_values.new_zeros(ctx.packed_shape) if grad_packed is None else grad_packed.contiguous()
        if grad_values is not None:
            values = grad[:, :, :, 2]
            values += grad_values.view(values.shape)
        return grad


def split_values(packed):
    """``(packed, v)``: v of packed (B, N, heads, 3, head_dim) as a new contiguous (B, N, heads * head_dim)
    tensor (the LePE input); with autograd the two gradients join in place (:class:`_SplitValues`)."""
    if torch.is_grad_enabled() and packed.requires_grad:
        return _SplitValues.apply(packed)
    return packed, _copy_values(packed)


def apply_rope(packed, rope):
    """Rotate adjacent channel pairs ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)`` of q and k.

    One complex multiplication in float32/float64 (in place when no gradient is recorded); elementwise
    for other dtypes (bf16/fp16 under autocast).

    Args:
        packed (Tensor): Shape (B, N, heads, 3, head_dim), q, k and v; adjacent channels form the pairs.
        rope (RotaryTables): Tables from :func:`rope_tables`.

    Returns:
        Tensor: The rotated packed tensor.
    """
    if packed.dtype == rope.complex.real.dtype:
        if not torch.is_grad_enabled():
            torch.view_as_complex(packed.unflatten(-1, (-1, 2))).mul_(rope.complex)
            return packed
        return _rotate(packed, rope.complex)
    cos, sin = rope.cos.to(packed.dtype), rope.sin.to(packed.dtype)
    pairs = packed.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
