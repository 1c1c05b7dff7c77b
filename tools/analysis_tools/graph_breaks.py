"""Count the graph breaks that torch.compile (dynamo) meets in a SecViT backbone forward.

    python tools/analysis_tools/graph_breaks.py --arch tiny --size 224x224

Prints, for eval (no grad) and train mode, the number of graphs, of graph breaks, and each break reason
with its count (``torch._dynamo.explain``).
"""
import argparse
import collections

import torch


def explain(model, x):
    """(graphs, breaks, Counter of break reasons) of one forward of ``model`` on ``x``."""
    torch._dynamo.reset()
    result = torch._dynamo.explain(model)(x)
    reasons = collections.Counter(str(getattr(b, 'reason', b)).splitlines()[0][:160] for b in result.break_reasons)
    return result.graph_count, result.graph_break_count, reasons


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', default='224x224', help='HxW input size')
    parser.add_argument('--cluster-size', type=int, default=None, help='tokens per cluster (default: official)')
    args = parser.parse_args(argv)
    from mmsecvit import SecViT
    height, width = (int(v) for v in args.size.split('x'))
    model = SecViT(args.arch, cluster_size=args.cluster_size)
    x = torch.randn(1, 3, height, width)
    for mode in ('eval', 'train'):
        model.train(mode == 'train')
        try:
            with torch.set_grad_enabled(mode == 'train'):
                graphs, breaks, reasons = explain(model, x)
        except Exception as error:  # report a failed trace as a result, then go on
            print(f'{mode}: tracing failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}')
            continue
        print(f'{mode}: {graphs} graphs, {breaks} graph breaks')
        for reason, count in reasons.most_common():
            print(f'  {count:3d}x {reason}')


if __name__ == '__main__':
    main()
