"""Write the synthetic shapes set in the COCO layout (what tools/demo.py trains on).

    python tools/make_coco_demo.py [data/coco_demo] [--num-train 300] [--num-val 60] [--size 128] [--seed 0]
"""
import argparse

from mmsecvit.demo.coco import make_coco_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', nargs='?', default='data/coco_demo', help='output directory (data_root)')
    parser.add_argument('--num-train', type=int, default=300, help='training images')
    parser.add_argument('--num-val', type=int, default=60, help='validation images')
    parser.add_argument('--size', type=int, default=128, help='image height and width in pixels')
    parser.add_argument('--seed', type=int, default=0, help='same seed, same files')
    args = parser.parse_args(argv)
    counts = make_coco_demo(args.root, args.num_train, args.num_val, (args.size, args.size), seed=args.seed)
    print(f'Wrote {args.root}: {counts} instances (train/val)')


if __name__ == '__main__':
    main()
