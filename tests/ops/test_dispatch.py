"""The dispatch point: which kernel builds load, the switch, and the reasons given for paths not taken."""
import pytest
import torch

from mmsecvit.ops import (
    dispatch,
    sec_attention,
    use_kernels,
)


def test_kernels_are_built_for_every_instruction_set_this_cpu_runs():
    # setup builds both kernel builds on x86-64; each that the CPU runs must load (AVX2 on every x86-64 CPU
    # PyTorch vectorises for, AVX-512 where present), and the best is the default.
    assert dispatch.available_isas() == dispatch.cpu_isas()
    if dispatch.cpu_isas():
        assert dispatch.kernel_isa() == dispatch.cpu_isas()[0]
        assert dispatch.kernels().isa() == dispatch.kernel_isa()


def test_switch_turns_the_kernels_off_and_says_why():
    packed = torch.randn(1, 300, 2, 3, 32)
    with use_kernels(False):
        assert dispatch.kernel_isa() is None
        assert dispatch.choose_backend('cluster_attention', packed, 98) == 'chunked'
        assert 'switched off' in dispatch.why_not('cluster_attention', packed, 98)['kernel'][0]
        with pytest.raises(RuntimeError, match='switched off'):
            sec_attention(packed, 98, impl='kernel')
    with pytest.raises(ValueError, match='isa must be one of'):
        dispatch.set_kernels(True, isa='sse2')
    with pytest.raises(ValueError, match='MMSECVIT_KERNELS'):
        dispatch._parse_setting('fast')
    assert dispatch._parse_setting('0') is None and dispatch._parse_setting('avx2') == 'avx2'


def test_attention_backend_picks_the_fastest_for_the_input(backend):
    packed = torch.randn(1, 300, 2, 3, 32)

    def choose(packed, cluster_len=98):
        return dispatch.choose_backend('cluster_attention', packed, cluster_len)

    assert choose(packed) == ('chunked' if backend == 'pytorch' else 'kernel')
    assert choose(packed.double()) == 'chunked'
    assert choose(torch.randn(1, 300, 1, 3, 64)) == 'chunked'  # head_dim the kernel does not cover
    assert 'head_dim 64' in dispatch.why_not('cluster_attention', torch.randn(1, 300, 1, 3, 64), 98)['kernel'][-1]
    assert choose(packed, dispatch.CHUNKED_MAX_CLUSTER + 1) == 'fused'
    assert choose(packed.bfloat16()) == 'fused'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert choose(packed) == 'fused'
        assert 'CPU autocast is on' in dispatch.why_not('cluster_attention', packed, 98)['kernel']
