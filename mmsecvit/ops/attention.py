"""Semantic Equitable Clustering (SEC) attention on packed q/k/v.

Per image and per head, the keys are summed into one centre, every token is ranked by the cosine
similarity of its key to that centre (a single argsort), the ranked sequence is cut into clusters of
equal length, attention runs inside each cluster and the result is put back in the original order.
When the token count is not a multiple of the cluster length, the last cluster is shorter: nothing is
padded, and no padded token shifts the centre or is attended to.

q, k and v of one (token, head) pair are stored as one row of ``3 * head_dim`` values (a "packed" tensor
of shape (B, N, heads, 3, head_dim)). Every head's tokens in cluster order are then a list of row indices,
and each cluster a consecutive run of that list.

Backends of the attention inside clusters (chosen in :mod:`mmsecvit.ops.dispatch`):

- ``'kernel'``: the compiled CPU kernel reads each cluster's rows through the index list (rotating q and k
  in its copy of them, given the rotary tables) and writes every result row straight to its place.
- ``'chunked'``: the rows permuted into cluster order, batched matrix products over cache-sized chunks of
  clusters (:class:`_ClusterAttention`), and the inverse permutation back.
- ``'fused'``: the same permutations around PyTorch's fused attention over a 4-D batch.
"""
import contextlib
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from . import kernels as compiled
from .rotary import RotaryTables, apply_rope

IMPLEMENTATIONS = tuple(dispatch.BACKENDS['cluster_attention'])


def cluster_length(num_tokens: int, num_clusters: int = -1, cluster_size: int = -1) -> int:
    """Length of each cluster for a sequence of ``num_tokens`` tokens.

    Exactly one of the two settings decides; -1 (or a single cluster) means global attention, which is
    returned as ``num_tokens``.

    Args:
        num_tokens (int): Tokens in the sequence (H * W of the feature map).
        num_clusters (int): Fixed number of clusters (the official behaviour): clusters are
            ``ceil(num_tokens / num_clusters)`` long. Used when ``cluster_size`` is -1.
        cluster_size (int): Fixed maximum tokens per cluster: the cluster count grows with the image
            (``ceil(num_tokens / cluster_size)``) and the tokens are shared out evenly between them.
    """
    if cluster_size > 0:
        num_clusters = math.ceil(num_tokens / cluster_size)
    if num_clusters <= 1:
        return num_tokens
    return math.ceil(num_tokens / min(num_clusters, num_tokens))


@torch.no_grad()
def semantic_order(packed: Tensor, rope: Optional[RotaryTables] = None) -> Tensor:
    """Rank each head's tokens by the cosine similarity of their key to the keys' sum (ascending).

    The centre's length, a positive factor per head, does not change the ranking.

    Args:
        packed (Tensor): Packed q, k, v of shape (B, N, heads, 3, head_dim).
        rope (RotaryTables | None): If given, the keys are not rotated yet and are ranked rotated.

    Returns:
        Tensor: Token indices of shape (B, heads, N).
    """
    batch, num_tokens, heads, _, head_dim = packed.shape
    if dispatch.choose_backend('ranking', packed) == 'kernel':
        rows = packed.reshape(-1, 3 * head_dim).contiguous()
        if rope is None:
            return compiled.semantic_order(rows, batch, num_tokens, heads, None, 0, 0)
        return compiled.semantic_order(rows, batch, num_tokens, heads, rope.axes, rope.height, rope.width)
    return argsort_rows(key_scores(packed, rope))


def key_scores(packed: Tensor, rope: Optional[RotaryTables] = None) -> Tensor:
    """Ranking scores (B, heads, N): cosine similarity of each key to the keys' sum.

    Computed as the ranking kernel computes them, whatever the input dtype or autocast state: the keys
    in float64, their sum rounded to float32, dot products and norms in float64, the scores rounded to
    float32 (float64 input keeps float64 throughout). Every path then ranks the same keys alike. An ONNX
    export keeps the float64 ops: onnxruntime's CPU provider has double kernels for all of them.
    """
    exact = packed.dtype == torch.float64
    device_type = packed.device.type
    # torch.autocast raises on devices without autocast (meta, where timm checks its configs).
    no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                   else contextlib.nullcontext())
    with no_autocast:
        if rope is not None:
            packed = apply_rope(packed if packed.dtype in (torch.float32, torch.float64) else packed.float(), rope)
        k = packed[:, :, :, 1].double()
        centre = k.sum(dim=1)
        if not exact:
            centre = centre.float().double()
        dots = torch.einsum('bnhd,bhd->bhn', k, centre)
        scores = dots / torch.linalg.vector_norm(k, dim=-1).transpose(1, 2).clamp_min(1e-12)
        return scores if exact else scores.float()


def argsort_rows(scores: Tensor) -> Tensor:
    """``scores.argsort(dim=-1, stable=True)`` of a (B, heads, N) tensor: equal scores keep token order, as in
    the ranking kernel.

    Long float32 CPU rows are ranked by one sort of 64-bit integer keys, ``row << 32 | order-preserving bits
    of the score``, which PyTorch radix-sorts across threads (see docs/performance.md).
    """
    num_tokens = scores.shape[-1]
    backend = dispatch.choose_backend('argsort', scores)
    if backend == 'argsort':
        return scores.argsort(dim=-1, stable=True)
    if backend == 'topk':
        # ONNX has no stable sort; its TopK puts equal scores in index order, as the stable argsort does.
        return scores.topk(num_tokens, dim=-1, largest=False).indices
    bits = scores.contiguous().view(torch.int32).to(torch.int64)
    # Negative floats order by decreasing magnitude: flipping their magnitude bits makes the signed
    # integers order like the floats; the offset then makes every key non-negative.
    keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) + 2 ** 31
    rows = torch.arange(scores.shape[0] * scores.shape[1], device=scores.device).view(scores.shape[:2] + (1,))
    flat = (keys + (rows << 32)).flatten().sort(stable=True).indices.view(scores.shape)
    return flat - rows * num_tokens


def cluster_assignment(packed: Tensor, cluster_len: int, rope: Optional[RotaryTables] = None) -> Tensor:
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


def cluster_slot_sources(order: Tensor, split: int) -> Tensor:
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


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention with scores ``q @ k^T`` (``k`` carries the scale)."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


Parts = List[Tuple[int, int, int]]


def _chunks(parts: Parts):
    """Yield (first row, clusters, cluster length) pieces of ``parts`` sized to hold ~CHUNK_SCORES scores."""
    for start, count, length in parts:
        step = max(1, dispatch.CHUNK_SCORES // (length * length))
        for first in range(0, count, step):
            num = min(step, count - first)
            yield start + first * length, num, length


def _cluster_qkv(slots: Tensor, first: int, num: int, length: int):
    """q, k, v views (num, length, head_dim) of consecutive clusters in ``slots`` (rows, 3, head_dim)."""
    return slots[first:first + num * length].view(num, length, 3, -1).unbind(2)


def _cluster_probs(q: Tensor, k: Tensor) -> Tensor:
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
            out[first:first + num * length].view(num, length, -1).copy_(torch.bmm(probs, v))
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


def sec_attention(packed: Tensor, cluster_len: int, impl: Optional[str] = None,
                  rope: Optional[RotaryTables] = None) -> Tensor:
    """SEC attention on packed q, k, v.

    Args:
        packed (Tensor): Shape (B, N, heads, 3, head_dim): q and k with rotary embedding, k scaled by
            ``head_dim ** -0.5``, and v; or, with ``rope``, q and k before both.
        cluster_len (int): Tokens per cluster; ``>= N`` means global attention.
        impl (str | None): One of :data:`IMPLEMENTATIONS` to force a backend; None lets
            :func:`mmsecvit.ops.dispatch.choose_backend` pick. Global attention always uses the fused one.
        rope (RotaryTables | None): Rotary tables of the map when ``packed`` is not rotated yet.

    Returns:
        Tensor: Shape (B, N, heads * head_dim), in the original token order.
    """
    batch, num_tokens, heads, _, head_dim = packed.shape
    global_attention = cluster_len >= num_tokens
    if not global_attention:
        if impl is None:
            impl = dispatch.choose_backend('cluster_attention', packed, cluster_len)
        elif impl not in IMPLEMENTATIONS:
            raise ValueError(f'Unknown SEC attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}')
        elif impl == 'kernel':
            reasons = dispatch.why_not('cluster_attention', packed, cluster_len).get('kernel')
            if reasons:
                raise RuntimeError(f'The cluster-attention kernel cannot run: {"; ".join(reasons)}')
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
        axes, rope_heads, height, width, key_scale = (None, 1, 0, 0, 1.0) if rope is None else rope.kernel_args(heads)
        out = compiled.cluster_attention(rows, sources, [value for part in parts for value in part], axes,
                                         rope_heads, height, width, key_scale)
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


def _copy_values(packed: Tensor) -> Tensor:
    """v of packed (B, N, heads, 3, head_dim) as a new contiguous (B, N, heads * head_dim) tensor."""
    return packed[:, :, :, 2].clone(memory_format=torch.contiguous_format).flatten(2)


class _SplitValues(torch.autograd.Function):
    """Packed q/k/v passed on, and a contiguous copy of v, with one backward.

    v feeds both the attention (through the packed tensor) and the LePE branch (through the copy). Plain
    autograd would give the copy's gradient a packed-size zero tensor and then add the two packed-size
    gradients; here it is added into v's slice of the packed gradient in place. That gradient is the
    attention's own new tensor (from the kernel, the inverse permutation or the rotary embedding's
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


def split_values(packed: Tensor) -> Tuple[Tensor, Tensor]:
    """``(packed, v)``: v of packed (B, N, heads, 3, head_dim) as a new contiguous (B, N, heads * head_dim)
    tensor (the LePE input); with autograd the two gradients join in place (:class:`_SplitValues`)."""
    if (torch.is_grad_enabled() and packed.requires_grad
            and dispatch.choose_backend('split_values') == 'joined_grad'):
        return _SplitValues.apply(packed)
    return packed, _copy_values(packed)
