"""Run the SecViT backbone on a sample input and print its multi-scale outputs."""
import argparse
import time

import torch

from mmsecvit import SecViT


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--arch', default='small')
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1344), metavar=('H', 'W'))
    parser.add_argument('--cluster-size', type=int, default=98)
    args = parser.parse_args()
    model = SecViT(args.arch, cluster_size=args.cluster_size).eval()
    x = torch.randn(1, 3, *args.size)
    start = time.perf_counter()
    with torch.no_grad():
        outs = model(x)
    print(f'SecViT-{args.arch} on {tuple(x.shape)} in {time.perf_counter() - start:.2f} s')
    for i, out in zip(model.out_indices, outs):
        print(f'  stage {i + 1}: {tuple(out.shape)} (stride {4 * 2 ** i})')


if __name__ == '__main__':
    main()
