import pytest

from mmsecvit.flops import count_flops
from mmsecvit.models import SecViT, SecViTClassifier

OFFICIAL_GFLOPS = {'tiny': 2.5, 'small': 4.4}


def analytic_attention_flops(model, height, width):
    """Sum over blocks of N * L * 2C multiply-adds (q k^T and attn v, all heads), from the cluster plan."""
    total = 0
    for stage in model.stages:
        tokens = height * width
        for block in stage.blocks:
            cluster_len = block.attn.cluster_length(tokens)
            full, rest = divmod(tokens, cluster_len)
            total += (full * cluster_len * cluster_len + rest * rest) * 2 * stage.blocks[0].attn.proj.in_features
        height, width = (height + 1) // 2, (width + 1) // 2
    return total


@pytest.mark.parametrize('arch', ['tiny', 'small'])
def test_classifier_flops_match_official_convention(arch):
    complexity = count_flops(SecViTClassifier(arch), (3, 224, 224))
    # The official figures leave out the attention matmuls; the full count is reported beside them.
    assert complexity.flops_without_attention / 1e9 == pytest.approx(OFFICIAL_GFLOPS[arch], rel=0.05)
    assert complexity.attention_flops == analytic_attention_flops(SecViTClassifier(arch).backbone, 56, 56)


def test_attention_flops_at_detection_resolution_follow_cluster_plan():
    model = SecViT('tiny', cluster_size=98)
    complexity = count_flops(model, (3, 800, 1344))
    assert complexity.attention_flops == analytic_attention_flops(model, 200, 336) > 0
    # Official 32/8/2 clusters (2100-token clusters at this size) against 98 tokens per cluster, both with
    # global attention in stage 4: only the attention matmuls differ.
    fixed = count_flops(SecViT('tiny'), (3, 800, 1344))
    linear = count_flops(SecViT('tiny', cluster_size=(98, 98, 98, -1)), (3, 800, 1344))
    assert fixed.attention_flops > 10 * linear.attention_flops
    assert fixed.flops_without_attention == linear.flops_without_attention
