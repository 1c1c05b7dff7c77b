"""Time an eval forward spends deriving values from parameters and buffers, which nothing keeps between calls.

The backbone recomputes, at every call: batch norms folded into the stem and downsampling convolutions,
the depthwise kernels plus identity of the residual convolutions, the per-head row order of each qkv
weight, and each stage's rotary tables. A cache would save at most this time (and could go stale, see
docs/performance.md). The script wraps those functions with timers, runs eval forwards (no grad) and prints
their share of the forward time.

    python tools/analysis_tools/derived_values_cost.py --arch small --sizes 224x224 800x1344
"""
import argparse
import statistics
import time
from collections import defaultdict

import torch

import mmsecvit.models.secvit as secvit
from mmsecvit.ops import conv_norm, depthwise, linear, rotary

TIMED = defaultdict(float)


def timed(name, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        TIMED[name] += time.perf_counter() - start
        return result
    return wrapper


def install_timers():
    conv_norm.fold_batch_norm = timed('batch norm folding', conv_norm.fold_batch_norm)
    depthwise._conv_weight = timed('depthwise kernel + identity', depthwise._conv_weight)
    linear.PackedQKV.per_head = timed('qkv rows per head', linear.PackedQKV.per_head)
    secvit.rope_tables = timed('rotary tables', secvit.rope_tables)
    rotary.RotaryTables._build_per_token = timed('rotary tables', rotary.RotaryTables._build_per_token)


def measure(model, size, repeats):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        model(x)
        totals, shares = [], defaultdict(list)
        for _ in range(repeats):
            TIMED.clear()
            start = time.perf_counter()
            model(x)
            totals.append(time.perf_counter() - start)
            for name, seconds in TIMED.items():
                shares[name].append(seconds)
    return statistics.median(totals), {name: statistics.median(values) for name, values in shares.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='small')
    parser.add_argument('--sizes', nargs='+', default=['224x224', '800x1344'])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--cluster-size', type=int, default=98, help='tokens per cluster, as in the benchmark')
    args = parser.parse_args()
    install_timers()
    model = secvit.SecViT(args.arch, cluster_size=args.cluster_size).eval()
    print(f'SecViT-{args.arch} (cluster_size {args.cluster_size}), batch 1, eval forward without grad, '
          f'{torch.get_num_threads()} threads; '
          'median of repeats, milliseconds')
    for size in args.sizes:
        total, parts = measure(model, tuple(int(v) for v in size.split('x')), args.repeats)
        derived = sum(parts.values())
        print(f'{size}: forward {total * 1e3:.1f}, derived values {derived * 1e3:.2f} '
              f'({100 * derived / total:.2f}% of the forward)')
        for name, seconds in sorted(parts.items()):
            print(f'    {name}: {seconds * 1e3:.2f}')


if __name__ == '__main__':
    main()
