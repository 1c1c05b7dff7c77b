"""Depthwise convolutions and SecViT-T under bfloat16 CPU autocast against float32.

Times in ms (the minimum over ``--repeats`` runs after one warm-up) of SecViT's depthwise convolutions on a
stage-1 (64 channels, 200x336: 800x1344 input) and a stage-2 map (128 channels, 100x168): the residual 3x3
CPE, the 5x5 LePE and the FFN's GELU + residual 3x3 (on 3x the channels), forward without gradients and
forward + backward. Each runs in float32; under bfloat16 autocast on bfloat16 inputs (what autocast's linear
layers give) as before, by ``F.conv2d`` under autocast (the old path); as now, by ``depthwise_nhwc`` (whose
``depthwise_precision`` op picks float32 or native bfloat16); and by ``depthwise_nhwc`` dispatching as if
oneDNN had no bfloat16 convolution here (every convolution in float32, as on CPUs without AVX-512). Then
SecViT-T's forward and training step at ``--size`` in float32 and under bfloat16 autocast with the float32
backend switched off (before), as now (after) and always taken (all float32). Steps run in turns, run by
run. Ratios are over float32. ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``
approximates a CPU without AVX-512, where oneDNN has no bfloat16 convolution.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python tools/analysis_tools/bf16_depthwise.py --repeats 5

(glibc then keeps freed memory, as ``benchmark.py --allocator tuned`` does.)
"""
import argparse
import contextlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmsecvit import SecViT
from mmsecvit.ops import depthwise_nhwc, dispatch, gelu_depthwise_nhwc
from mmsecvit.ops.depthwise import _conv_weight

MAPS = {'stage1': (64, 200, 336), 'stage2': (128, 100, 168)}
# Name: (kernel size, residual, GELU first, channels over the stage's).
CONVS = {'cpe3x3': (3, True, False, 1), 'lepe5x5': (5, False, False, 1), 'ffn_gelu3x3': (3, True, True, 3)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=1, help='batch of the depthwise maps')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs; the minimum is reported')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch CPU threads')
    parser.add_argument('--size', default='512x512', help='HxW input of the SecViT-T step')
    parser.add_argument('--skip-ops', action='store_true', help='only the SecViT-T step')
    parser.add_argument('--skip-model', action='store_true', help='only the depthwise convolutions')
    return parser.parse_args(argv)


@contextlib.contextmanager
def float32_backend(setting):
    """The depthwise float32 backend 'off' (the path before it existed), 'on' (as dispatched) or 'always' (as if
    oneDNN had no half-precision convolution on this CPU)."""
    backends, onednn = dispatch.BACKENDS['depthwise_precision'], dict(dispatch._ONEDNN_HALF)
    check = backends['float32']
    if setting == 'off':
        backends['float32'] = lambda *args: ['switched off by the benchmark']
    elif setting == 'always':
        dispatch._ONEDNN_HALF.update(dict.fromkeys(onednn, False))
    try:
        yield
    finally:
        backends['float32'] = check
        dispatch._ONEDNN_HALF.update(onednn)


def best_ms(steps, repeats):
    """Warm each step up, then run them in turns; the minimum time of each in ms."""
    for step in steps.values():
        step()
    times = {name: float('inf') for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name] = min(times[name], time.perf_counter() - start)
    return {name: 1e3 * value for name, value in times.items()}


def conv_steps(name, channels, height, width, batch):
    """Forward and forward + backward steps of one convolution: float32, bf16 autocast before and after."""
    kernel_size, residual, gelu, widen = CONVS[name]
    channels *= widen
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
    x32 = torch.randn(batch, height, width, channels)
    x16 = x32.bfloat16()
    grad32 = torch.randn_like(x32)
    grad16 = grad32.bfloat16()

    def new(x):
        return depthwise_nhwc(conv, x, residual) if not gelu else gelu_depthwise_nhwc(conv, x, residual)

    def old(x):
        nchw = (F.gelu(x) if gelu else x).permute(0, 3, 1, 2)
        return F.conv2d(nchw, _conv_weight(conv, residual), conv.bias, 1, kernel_size // 2, 1,
                        channels).permute(0, 2, 3, 1)

    def forward(function, x, autocast, backend='on'):
        with torch.no_grad(), float32_backend(backend), torch.autocast('cpu', dtype=torch.bfloat16,
                                                                       enabled=autocast):
            function(x)

    def train(function, x, grad, autocast, backend='on'):
        x = x.detach().requires_grad_()
        with float32_backend(backend):
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                out = function(x)
            out.backward(grad)
        conv.zero_grad(set_to_none=True)

    return {
        'fwd': {'float32': lambda: forward(new, x32, False), 'before': lambda: forward(old, x16, True),
                'after': lambda: forward(new, x16, True), 'always': lambda: forward(new, x16, True, 'always')},
        'fwd+bwd': {'float32': lambda: train(new, x32, grad32, False),
                    'before': lambda: train(old, x16, grad16, True),
                    'after': lambda: train(new, x16, grad16, True),
                    'always': lambda: train(new, x16, grad16, True, 'always')},
    }


def model_steps(size):
    """SecViT-T forward (eval, no grad) and training step (loss = sum of output means), by setting."""
    height, width = (int(v) for v in size.lower().split('x'))
    model = SecViT('t')
    x = torch.randn(1, 3, height, width)
    settings = {'float32': (False, 'on'), 'before': (True, 'off'), 'after': (True, 'on'), 'always': (True, 'always')}

    def forward(autocast, backend):
        model.eval()
        with torch.no_grad(), float32_backend(backend), torch.autocast('cpu', dtype=torch.bfloat16,
                                                                       enabled=autocast):
            model(x)

    def train(autocast, backend):
        model.train()
        with float32_backend(backend):
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                outs = model(x)
            sum(o.float().mean() for o in outs).backward()
        model.zero_grad(set_to_none=True)

    return {'fwd': {key: lambda s=s: forward(*s) for key, s in settings.items()},
            'fwd+bwd': {key: lambda s=s: train(*s) for key, s in settings.items()}}


def row(label, times):
    base = times['float32']
    return f'| {label} | {base:.1f} | ' + ' | '.join(
        f'{times[key]:.1f} ({times[key] / base:.2f}x)' for key in ('before', 'after', 'always')) + ' |'


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, '
          f'kernels: {dispatch.kernel_isa()}; ms, min of {args.repeats}; (x): over float32')
    print(f'oneDNN convolves bfloat16 here: {dispatch._ONEDNN_HALF[torch.bfloat16]}')
    print('| case | float32 | bf16 autocast before | bf16 autocast after | bf16 autocast, all float32 |')
    print('|---|---|---|---|---|')
    if not args.skip_ops:
        for map_name, (channels, height, width) in MAPS.items():
            for conv_name in CONVS:
                steps = conv_steps(conv_name, channels, height, width, args.batch)
                for mode, by_setting in steps.items():
                    label = f'{map_name} B={args.batch} {conv_name} {mode}'
                    print(row(label, best_ms(by_setting, args.repeats)), flush=True)
    if not args.skip_model:
        for mode, by_setting in model_steps(args.size).items():
            print(row(f'SecViT-T {args.size} {mode}', best_ms(by_setting, args.repeats)), flush=True)


if __name__ == '__main__':
    main()
