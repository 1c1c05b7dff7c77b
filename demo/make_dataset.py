"""Write a synthetic demo set: shapes in the COCO layout (detection) or scenes in the ADE20K layout
(segmentation), deterministic from --seed.

    python demo/make_dataset.py coco [--out data/coco_demo] [--num-train 300] [--num-val 60] [--seed 0]
    python demo/make_dataset.py ade [--out data/ade_demo/ADEChallengeData2016] [--num-train 160] [--num-val 40]
"""
import argparse

from ade import make_ade_demo  # demo/ is the script's directory
from coco import make_coco_demo

DEFAULTS = {'coco': ('data/coco_demo', 300, 60), 'ade': ('data/ade_demo/ADEChallengeData2016', 160, 40)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('kind', choices=sorted(DEFAULTS), help='coco (detection) or ade (segmentation)')
    parser.add_argument('--out', help='root of the set (default: the demo configs\' data_root)')
    parser.add_argument('--num-train', type=int, help='training images')
    parser.add_argument('--num-val', type=int, help='validation images')
    parser.add_argument('--seed', type=int, default=0, help='same seed, same files')
    args = parser.parse_args(argv)
    out, num_train, num_val = DEFAULTS[args.kind]
    out, num_train, num_val = args.out or out, args.num_train or num_train, args.num_val or num_val
    make = make_coco_demo if args.kind == 'coco' else make_ade_demo
    counts = make(out, num_train=num_train, num_val=num_val, seed=args.seed)
    objects = f' holding {counts["train"]} and {counts["val"]} objects' if args.kind == 'coco' else ''
    print(f'Wrote {out}: {num_train} training and {num_val} validation images{objects}')


if __name__ == '__main__':
    main()
