"""The lifeiqa-fast command: `lifeiqa-fast score ...` scores images, `lifeiqa-fast info` says what was built."""
from __future__ import annotations

import argparse
import csv
import json
import sys

NO_CHECKPOINT = """\
lifeiqa-fast score: --checkpoint is required.
Life-IQA has no use without trained weights: its head is trained on a quality dataset (KonIQ-10k,
SPAQ, LIVEC, ...), so a random model scores noise. Get weights in one of two ways:
  - the authors' released checkpoints (github.com/TANGLONG2/Life-IQA), which load as they are;
  - train one: the model is lifeiqa_fast.LifeIQA, a torch module; save it with
    lifeiqa_fast.save_checkpoint(model, "ckpt.pth").
Then: lifeiqa-fast score PATH... --checkpoint ckpt.pth"""


def _crops(value: str):
    if value == "grid":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 'grid' or a positive number of random crops, got {value!r}")
    return n


def _resize(value: str):
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto, none or HxW such as 512x384, got {value!r}") from None
    return h, w


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lifeiqa-fast", description="Life-IQA image quality scores, fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score images", description=(
        "Score image files, folders (searched recursively) and globs. Unreadable files are reported and "
        "skipped; the exit status is 1 if any were, 0 otherwise."))
    score.add_argument("paths", nargs="+", metavar="PATH")
    score.add_argument("--checkpoint", help="Life-IQA weights: an official checkpoint or save_checkpoint's file")
    score.add_argument("--crops", type=_crops, default="grid",
                       help="'grid' (default: a deterministic grid of 224 crops covering the image) or N random "
                            "224 crops (the authors' test protocol, seeded)")
    score.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    score.add_argument("--resize", type=_resize, default="auto",
                       help="auto (default: 512x384 for KonIQ/SPAQ checkpoints), none, or HxW")
    score.add_argument("--batch-size", type=int, default=32, help="crops per forward pass (default 32)")
    score.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    score.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto: bf16 on GPUs and on CPUs with native bf16, else fp32")
    score.add_argument("--compile", action="store_true",
                       help="torch.compile the model: faster for many images, after a one-time compile (~1 min)")
    score.add_argument("--impl", default="auto", help="the head's kernels (default auto)")
    out = score.add_mutually_exclusive_group()
    out.add_argument("--json", metavar="OUT", help="write [{path, score, error}, ...] to OUT")
    out.add_argument("--csv", metavar="OUT", help="write path,score,error rows to OUT")
    commands.add_parser("info", help="what was built and which kernels impl='auto' picks")
    return parser


def _score(args) -> int:
    from . import Scorer
    from .scorer import find_images

    if not args.checkpoint:
        print(NO_CHECKPOINT, file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"lifeiqa-fast score: --batch-size must be positive, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        files = find_images(args.paths)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not files:
        print("lifeiqa-fast score: no image files found in " + " ".join(args.paths), file=sys.stderr)
        return 2
    try:
        scorer = Scorer(args.checkpoint, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        crops=args.crops, seed=args.seed, resize=args.resize, compile=args.compile, impl=args.impl,
                        progress=True)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        print(f"lifeiqa-fast score: {exc}", file=sys.stderr)
        return 2
    results = scorer.score_files(files)
    width = max(len(str(r.path)) for r in results)
    for r in results:
        print(f"{str(r.path):<{width}}  {r.score:8.4f}" if r.error is None else f"{str(r.path):<{width}}  skipped")
    rows = [{"path": str(r.path), "score": r.score, "error": r.error} for r in results]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "score", "error"])
            writer.writeheader()
            writer.writerows(rows)
    skipped = [r for r in results if r.error is not None]
    for r in skipped:
        print(r.error, file=sys.stderr)
    if skipped:
        print(f"lifeiqa-fast score: {len(skipped)} of {len(results)} files skipped", file=sys.stderr)
    return 1 if skipped else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        from .info import format_info, info

        print(format_info(info()))
        return 0
    return _score(args)


if __name__ == "__main__":
    sys.exit(main())
