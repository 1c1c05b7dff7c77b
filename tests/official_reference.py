"""A plain, slow re-implementation of the official SecViT classifier, in the official key layout.

Written for the tests from the architecture description (NCHW tensors, 1x1 convs, explicit loops over
clusters), independent of mmsecvit's code, so that the fast backbone and the checkpoint converter can
be checked against it.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmsecvit.models import SecViT, convert_official_state_dict
from mmsecvit.models.secvit import ARCH_SETTINGS


def reference_rope(x, height, width):
    """2-D RoPE as in the official code: x (B, heads, H*W, d); interleaved pairs, rows then columns."""
    d = x.shape[-1]
    angle = 1.0 / (10000 ** torch.linspace(0, 1, d // 4, dtype=x.dtype))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()  # (d/2,)
    rows = torch.arange(height, dtype=x.dtype)[:, None] * angle  # (H, d/2)
    cols = torch.arange(width, dtype=x.dtype)[:, None] * angle  # (W, d/2)
    theta = torch.cat([rows[:, None, :].expand(height, width, -1), cols[None].expand(height, width, -1)], -1)
    theta = theta.reshape(height * width, d)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * theta.cos() + rotated * theta.sin()


def reference_cluster_attention(q, k, v, cluster_len):
    """Loop over images, heads and clusters; clusters are consecutive runs of the ranked tokens and the
    last one holds whatever real tokens remain. q, k, v: (B, heads, N, d), k already scaled."""
    batch, heads, num_tokens, _ = q.shape
    out = torch.empty_like(v)
    for b in range(batch):
        for h in range(heads):
            keys = k[b, h]
            centre = F.normalize(keys.mean(0, keepdim=True), dim=-1)
            order = torch.argsort((centre @ F.normalize(keys, dim=-1).T)[0])
            for start in range(0, num_tokens, cluster_len):
                idx = order[start:start + cluster_len]
                attn = torch.softmax(q[b, h, idx] @ keys[idx].T, dim=-1)
                out[b, h, idx] = attn @ v[b, h, idx]
    return out


class OfficialAttention(nn.Module):

    def __init__(self, dim, heads, num_clusters):
        super().__init__()
        self.heads, self.num_clusters = heads, num_clusters
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.out_proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(x)
        lepe = self.lepe(qkv[:, 2 * c:])
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        q = reference_rope(q, h, w)
        k = reference_rope(k, h, w) * (c // self.heads) ** -0.5
        clusters = self.num_clusters if self.num_clusters > 1 else 1
        out = reference_cluster_attention(q, k, v, math.ceil(h * w / clusters))
        return self.out_proj(out.transpose(-1, -2).reshape(b, c, h, w) + lepe)


class LayerNorm2d(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class OfficialFFN(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class OfficialBlock(nn.Module):

    def __init__(self, dim, heads, num_clusters, layer_scale):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1, self.norm2 = LayerNorm2d(dim), LayerNorm2d(dim)
        self.attn = OfficialAttention(dim, heads, num_clusters)
        self.ffn = OfficialFFN(dim, dim * 3)
        self.layer_scale = layer_scale
        if layer_scale:
            self.gamma_1 = nn.Parameter(1e-6 * torch.ones(1, dim, 1, 1))
            self.gamma_2 = nn.Parameter(1e-6 * torch.ones(1, dim, 1, 1))

    def forward(self, x):
        x = x + self.pos(x)
        g1, g2 = (self.gamma_1, self.gamma_2) if self.layer_scale else (1.0, 1.0)
        x = x + g1 * self.attn(self.norm1(x))
        return x + g2 * self.ffn(self.norm2(x))


class OfficialDownsample(nn.Module):

    def __init__(self, dim, out_dim):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x):
        return self.norm(self.reduction(x))


class OfficialRoPE(nn.Module):

    def __init__(self, head_dim):
        super().__init__()
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer('angle', angle.unsqueeze(-1).repeat(1, 2).flatten())


class OfficialLayer(nn.Module):

    def __init__(self, dim, out_dim, depth, heads, num_clusters, layer_scale):
        super().__init__()
        self.RoPE = OfficialRoPE(dim // heads)
        self.blocks = nn.ModuleList(OfficialBlock(dim, heads, num_clusters, layer_scale) for _ in range(depth))
        self.downsample = OfficialDownsample(dim, out_dim) if out_dim else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class OfficialSecViT(nn.Module):
    """The official classification network; ``forward_stages`` returns each stage's pre-downsampling map."""

    def __init__(self, embed_dims, depths, num_heads, layer_scale, num_clusters=(32, 8, 2, -1), num_classes=1000):
        super().__init__()
        c = embed_dims[0]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, 2, 1), nn.BatchNorm2d(c // 2), nn.GELU(),
            nn.Conv2d(c // 2, c // 2, 3, 1, 1), nn.BatchNorm2d(c // 2), nn.GELU(),
            nn.Conv2d(c // 2, c // 2, 3, 1, 1), nn.BatchNorm2d(c // 2), nn.GELU(),
            nn.Conv2d(c // 2, c, 3, 2, 1), nn.BatchNorm2d(c))
        n = len(depths)
        self.layers = nn.ModuleList(
            OfficialLayer(embed_dims[i], embed_dims[i + 1] if i + 1 < n else None, depths[i], num_heads[i],
                          num_clusters[i], layer_scale[i]) for i in range(n))
        self.proj = nn.Conv2d(embed_dims[-1], 1024, 1)
        self.norm = nn.BatchNorm2d(1024)
        self.head = nn.Conv2d(1024, num_classes, 1)

    def forward_stages(self, x):
        x = self.patch_embed.proj(x)
        outs = []
        for layer in self.layers:
            for block in layer.blocks:
                x = block(x)
            outs.append(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outs

    def forward(self, x):
        x = self.forward_stages(x)[-1]
        x = F.silu(self.norm(self.proj(x))).mean(dim=(2, 3), keepdim=True)
        return self.head(x).flatten(1)


OFFICIAL_PARAMS = {'tiny': 14_981_800, 'small': 26_776_104, 'base': 54_682_776, 'large': 96_495_096}


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def official_model(arch, **kwargs):
    s = ARCH_SETTINGS[arch]
    return OfficialSecViT(s['embed_dims'], s['depths'], s['num_heads'], s['layer_scale'], **kwargs)


def randomize_norms(model):
    """Give every norm non-trivial statistics and affine values, so a wrong mapping shows in the outputs."""
    for name, tensor in model.state_dict().items():
        if name.endswith(('gamma_1', 'gamma_2')):
            tensor.copy_(torch.rand_like(tensor) * 0.2)
        elif name.endswith('running_var') or 'norm' in name and name.endswith('weight'):
            tensor.copy_(torch.rand_like(tensor) + 0.5)
        elif name.endswith(('running_mean', 'bias')):
            tensor.copy_(torch.randn_like(tensor) * 0.1)


def official_training_checkpoint(path, arch='tiny', **extra):
    """Save an official-layout model with random weights the way the official training script does."""
    model = official_model(arch).eval()
    randomize_norms(model)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({'model': model.state_dict(), 'model_ema': ema, 'optimizer': {'state': {}, 'param_groups': []},
                'epoch': 299, 'args': argparse.Namespace(model='SecViT_T', lr=1e-3, drop_path=0.1), **extra}, path)
    return model


def build_pair(arch, **kwargs):
    """An official reference model with random weights and our backbone loaded from its converted state.

    Both run in float64: the argsort makes SEC discontinuous, and float32 rounding differences between two
    correct implementations can swap near-tied tokens across a cluster boundary after a few blocks.
    """
    official = official_model(arch, **kwargs).eval()
    randomize_norms(official)
    ours = SecViT(arch, out_norm_cfg=None, **kwargs)
    state = {k: v for k, v in convert_official_state_dict(official.state_dict()).items() if not k.startswith('head.')}
    ours.load_state_dict(state, strict=True)
    return official.double(), ours.eval().double()
