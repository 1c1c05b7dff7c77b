"""Write the synthetic ADE20K-layout demo set (deterministic from --seed).

    python tools/make_ade_demo.py [--out data/ade_demo/ADEChallengeData2016] [--train 160] [--val 40] [--seed 0]
"""
import argparse

from mmsecvit.demo.ade import make_ade_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/ade_demo/ADEChallengeData2016', help='root of the set')
    parser.add_argument('--train', type=int, default=160, help='training images')
    parser.add_argument('--val', type=int, default=40, help='validation images')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    counts = make_ade_demo(args.out, args.train, args.val, args.seed)
    print(f'Wrote {counts} images to {args.out}')


if __name__ == '__main__':
    main()
