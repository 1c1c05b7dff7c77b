"""Semantic Equitable Clustering (SEC) attention and the 2-D rotary position embedding it uses.

Per image and per head, the keys are averaged into one centre, every token is ranked by the cosine
similarity of its key to that centre (a single argsort), the ranked sequence is cut into clusters of
equal length, attention runs inside each cluster and the result is put back in the original order.

When the token count is not a multiple of the cluster length, the last cluster is shorter: it holds
only real tokens, so nothing is padded, no padded token shifts the centre and none is attended to.
"""
import math

import torch
import torch.nn.functional as F


def cluster_length(num_tokens, num_clusters=-1, cluster_size=-1):
    """Length of each cluster for a sequence of ``num_tokens`` tokens.

    Exactly one of the two settings decides; a value <= 0 (or a single cluster) means global attention,
    which is returned as ``num_tokens``.

    Args:
        num_tokens (int): Tokens in the sequence (H * W of the feature map).
        num_clusters (int): Fixed number of clusters (the official behaviour). Clusters are
            ``ceil(num_tokens / num_clusters)`` long. Used when ``cluster_size <= 0``.
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


@torch.no_grad()
def semantic_order(k):
    """Rank tokens by the cosine similarity of their key to the mean key (ascending).

    Args:
        k (Tensor): Keys of shape (B, heads, N, head_dim).

    Returns:
        Tensor: Token indices of shape (B, heads, N).
    """
    centre = F.normalize(k.mean(dim=2, keepdim=True), dim=-1)
    cosine = (k @ centre.transpose(-1, -2)).squeeze(-1) / torch.linalg.vector_norm(k, dim=-1).clamp_min(1e-12)
    return cosine.argsort(dim=-1)


def cluster_assignment(k, cluster_len):
    """Cluster index of every token, in the original token order.

    Args:
        k (Tensor): Keys of shape (B, heads, N, head_dim).
        cluster_len (int): Tokens per cluster; ``>= N`` puts every token in cluster 0.

    Returns:
        Tensor: Shape (B, heads, N), values in ``[0, ceil(N / cluster_len))``.
    """
    num_tokens = k.shape[-2]
    if cluster_len >= num_tokens:
        return torch.zeros(k.shape[:-1], dtype=torch.long, device=k.device)
    order = semantic_order(k)
    ranks_cluster = (torch.arange(num_tokens, device=k.device) // cluster_len).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks_cluster)


def clustered_attention(q, k, v, cluster_len):
    """Softmax attention inside consecutive clusters of ``cluster_len`` tokens (last one may be shorter).

    ``k`` must already carry the softmax scale: scores are ``q @ k^T`` as in the official code.

    Args:
        q, k, v (Tensor): Shape (..., N, d), already in cluster order.
        cluster_len (int): Tokens per cluster.

    Returns:
        Tensor: Shape (..., N, d).
    """
    num_tokens = q.shape[-2]
    num_full = num_tokens // cluster_len
    split = num_full * cluster_len

    def attend(start, stop, clusters):
        chunk = [t[..., start:stop, :].unflatten(-2, (clusters, -1)) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*chunk, scale=1.0).flatten(-3, -2)

    out = attend(0, split, num_full)
    if split < num_tokens:
        out = torch.cat([out, attend(split, num_tokens, 1)], dim=-2)
    return out


def sec_attention(q, k, v, cluster_len):
    """SEC attention: cluster by similarity to the key centre, attend inside clusters, restore order.

    Args:
        q, k, v (Tensor): Shape (B, heads, N, d); ``k`` already scaled by ``d ** -0.5``.
        cluster_len (int): Tokens per cluster; ``>= N`` means global attention.

    Returns:
        Tensor: Shape (B, heads, N, d) in the original token order.
    """
    num_tokens, head_dim = q.shape[-2:]
    if cluster_len >= num_tokens:
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    index = semantic_order(k).unsqueeze(-1).expand(-1, -1, -1, head_dim)
    q, k, v = (t.gather(2, index) for t in (q, k, v))
    out = clustered_attention(q, k, v, cluster_len)
    return out.new_empty(out.shape).scatter(2, index, out)


def rope_angles(head_dim, device=None):
    """Rotation frequencies of the 2-D rotary embedding: ``head_dim // 4`` values, each used twice.

    Returns:
        Tensor: Shape (head_dim // 2,), values ``1 / 10000 ** linspace(0, 1, head_dim // 4)`` interleaved.
    """
    if head_dim % 4:
        raise ValueError(f'2-D rotary embedding needs head_dim divisible by 4, got {head_dim}')
    angle = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4, device=device)
    return angle.repeat_interleave(2)


def rope_tables(height, width, angle):
    """Cosine and sine of the rotation for every token of an ``height x width`` map.

    The first half of the channel pairs rotate with the row index, the second half with the column index.

    Args:
        height, width (int): Feature map size.
        angle (Tensor): Output of :func:`rope_angles`, shape (head_dim // 2,).

    Returns:
        tuple[Tensor, Tensor]: cos and sin, each of shape (height * width, head_dim // 2), one value per
        channel pair.
    """
    half = angle[::2]  # one frequency per rotated pair
    rows = torch.arange(height, device=angle.device, dtype=angle.dtype)[:, None] * half
    cols = torch.arange(width, device=angle.device, dtype=angle.dtype)[:, None] * half
    theta = torch.cat([rows[:, None, :].expand(-1, width, -1), cols[None, :, :].expand(height, -1, -1)], dim=-1)
    theta = theta.flatten(0, 1)
    return theta.cos(), theta.sin()


def apply_rope(x, cos, sin):
    """Rotate adjacent channel pairs ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``.

    Args:
        x (Tensor): Shape (..., N, d), or any layout whose last two dims broadcast with the tables.
        cos, sin (Tensor): Shape broadcastable to (..., N, d // 2).

    Returns:
        Tensor: Same shape as ``x``.
    """
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
