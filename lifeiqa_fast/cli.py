"""The lifeiqa-fast command: `score` scores images, `train` and `eval` train and evaluate on a dataset,
`info` says what was built."""
from __future__ import annotations

import argparse
import csv
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from typing import TextIO

NO_MODEL = """\
lifeiqa-fast {command}: -m/--model is required.
Life-IQA has no use without trained weights: its head is trained on a quality dataset (KonIQ-10k,
SPAQ, LIVEC, ...), so a random model scores noise. Get weights in one of these ways:
  - the authors' released checkpoints (github.com/TANGLONG2/Life-IQA), which load as they are;
  - train one: lifeiqa-fast train writes OUT/DATASET/run<r>/best/, a save_pretrained folder;
  - a folder or Hugging Face Hub repo someone wrote with lifeiqa_fast.save_pretrained.
Then: lifeiqa-fast {command} ... -m MODEL (a .pth file, a folder, or a Hub repo id owner/name)"""
OUTPUT_FORMATS = {".json": "--json", ".csv": "--csv"}  # -o/--output's format, from its suffix


# `lifeiqa-fast train`'s flags that override a TrainConfig field: (flag, field, type, help).
TRAIN_OVERRIDES = tuple((flag, field or flag[2:].replace("-", "_"), kind, what) for flag, field, kind, what in (
    ("--repeats", None, int, "runs on different splits (preset: 10)"),
    ("--split-seed", None, int, "seed of the first split"), ("--split", None, str, "a split CSV to use"),
    ("--epochs", None, int, "epochs per run"), ("--batch-size", None, int, "crops per step"),
    ("--patch-num", None, int, "crops per training image per epoch"),
    ("--lr", "base_lr", float, "base learning rate"), ("--num-experts", None, int, "experts E"),
    ("--depth", None, int, "decoder layers"), ("--backbone", None, str, "a timm Swin, ResNet or ConvNeXt name"),
    ("--pretrained", None, str, "auto (timm's weights), none, or a weights file"),
    ("--impl", None, str, "the head's kernels"), ("--amp", None, str, "auto, fp16, bf16 or none"),
    ("--test-crops", None, str, "grid (default) or official (patch-num random crops)"),
    ("--workers", None, int, "data loading processes"), ("--device", None, str, "cpu, cuda, ..."),
    ("--seed", None, int, "training seed"), ("--limit", None, int, "use only the first N images"),
    ("--resize", None, str, "KonIQ/SPAQ: auto (the authors' 512x384), aspect, none")))


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
    if value.isdigit():
        return int(value)  # the short side, aspect kept
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto, none, HxW such as 512x384 or a short side such as 384, "
                                         f"got {value!r}") from None
    return h, w


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lifeiqa-fast", description="Life-IQA image quality scores, fast.")
    parser.add_argument("--list-datasets", action="store_true",
                        help="list the datasets (training presets) and the scale of their scores, then exit")
    commands = parser.add_subparsers(dest="command")
    score = commands.add_parser("score", help="score images", description=(
        "Score image files, folders (searched recursively) and globs. Unreadable files (broken links, FIFOs "
        "and devices too) are reported and skipped; the exit status is 1 if any were, 2 for bad arguments "
        "(an output file that cannot be written included), 0 otherwise. Under torchrun (torchrun "
        "--nproc-per-node N -m lifeiqa_fast.cli score ...) the files are shared among the processes and "
        "rank 0 writes the output, in input order."))
    score.add_argument("paths", nargs="+", metavar="PATH")
    _model_argument(score)
    score.add_argument("--protocol", choices=["grid", "official"],
                       help="official: the authors' test protocol (PATCH_NUM seeded random crops for the model's "
                            "dataset, fp32, their resize), to reproduce paper numbers; grid: --crops grid")
    score.add_argument("--crops", type=_crops, default="grid",
                       help="'grid' (default: a deterministic grid of 224 crops spread over the image) or N random "
                            "224 crops (seeded)")
    score.add_argument("--max-crops", type=int, default=20, help="the most crops of a grid (default 20; 0: no cap)")
    score.add_argument("--dataset", help="the model's training set, when its file does not record it (sets the "
                                         "score scale, the resize and the official crops)")
    score.add_argument("--normalize", action="store_true",
                       help="scores mapped to [0, 1], 1 the best (needs a known score scale)")
    score.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    score.add_argument("--resize", type=_resize, default="auto",
                       help="auto (default: 512x384 for KonIQ/SPAQ checkpoints), none, HxW, or a short side S")
    score.add_argument("--batch-size", type=int, default=32, help="crops per forward pass (default 32)")
    score.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    score.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto: bf16 on GPUs and on CPUs with native bf16, else fp32")
    score.add_argument("--compile", action="store_true",
                       help="torch.compile the model (a one-time 10-45 s; a few %% faster on a CPU)")
    score.add_argument("--impl", default="auto", help="the head's kernels (default auto)")
    out = score.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="FILE", help="write the scores to FILE, as JSON or CSV by its suffix")
    out.add_argument("--json", metavar="OUT", help="write {model, dataset, score_scale, ..., scores: [{path, score, "
                                                  "error}, ...]} to OUT")
    out.add_argument("--csv", metavar="OUT", help="write path,score,error rows to OUT")
    commands.add_parser("info", help="what was built and which kernels impl='auto' picks")

    export = commands.add_parser("export", help="export a model for deployment (ONNX)", description=(
        "Export the model, input RGB 224 x 224 crops in [0, 1] (B, 3, 224, 224), output one score per crop, "
        "through torch.onnx's dynamo exporter; what the score means is in the file's metadata."))
    _model_argument(export)
    export.add_argument("--onnx", metavar="OUT", required=True, help="the .onnx file to write")
    export.add_argument("--batch", default="dynamic", help="dynamic (default) or a fixed batch size")

    train = commands.add_parser("train", help="train with the authors' protocol", description=(
        "Train Life-IQA on a dataset with the authors' recipe (per-dataset presets from their configs), "
        "evaluating the test split every epoch; several runs on random 80/20 splits by reference image; "
        "several GPUs or machines through torchrun. Any preset value can be overridden."))
    train.add_argument("--dataset", required=True,
                       help="live, csiq, tid2013, kadid, livec, koniq, spaq, livefb or synthetic")
    train.add_argument("--root", required=True, help="the dataset's folder, laid out as it ships")
    train.add_argument("--config", help="a JSON or YAML file of settings (ours, or the authors' config layout)")
    train.add_argument("--out", default="runs", help="output folder (default runs/): OUT/DATASET/run<r>/...")
    train.add_argument("--resume", action="store_true",
                       help="continue the runs in OUT/DATASET from their last readable checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="delete what OUT/DATASET holds, then train (without --resume or --overwrite, a "
                            "non-empty OUT/DATASET is refused)")
    for flag, dest, kind, what in TRAIN_OVERRIDES:
        train.add_argument(flag, dest=dest, type=kind, help=what)

    ev = commands.add_parser("eval", help="SRCC/PLCC/KRCC of a checkpoint on a dataset")
    ev.add_argument("-m", "--model", "--checkpoint", dest="model", required=True,
                    help="a .pth checkpoint, a save_pretrained folder or a Hub repo id")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--root", required=True)
    ev.add_argument("--split", help="a split CSV: evaluate its test side (default: every image)")
    ev.add_argument("--crops", type=_crops, default="grid")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--device")
    return parser


def _model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", "--checkpoint", dest="model", metavar="MODEL",
                        help="Life-IQA weights: a .pth checkpoint (the authors' or save_checkpoint's), a "
                             "save_pretrained folder, or a Hugging Face Hub repo id (owner/name)")


def _list_datasets() -> int:
    from .scale import DATASET_SCALES
    from .images import RESIZED_DATASETS
    from .train import PRESETS

    print(f"{'dataset':<10} {'label':<28} {'range':>10}  {'better':<7} {'official crops':>14}  resize")
    for name, scale in DATASET_SCALES.items():
        low, high = scale.score_range
        resize = "x".join(map(str, RESIZED_DATASETS[name])) if name in RESIZED_DATASETS else "-"
        print(f"{name:<10} {scale.label:<28} {f'{low:g}..{high:g}':>10}  {'lower' if scale.lower_better else 'higher':<7} "
              f"{PRESETS[name]['patch_num']:>14}  {resize}")
    return 0


def _train(args) -> int:
    from .train import TrainConfig, read_config_file, train

    settings = read_config_file(args.config) if args.config else {}
    settings["out"] = args.out
    settings.update((field, getattr(args, field)) for _, field, _, _ in TRAIN_OVERRIDES
                    if getattr(args, field) is not None)
    try:
        config = TrainConfig.preset(args.dataset, args.root, **settings)
        summary = train(config, resume=args.resume, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"lifeiqa-fast train: {exc}", file=sys.stderr)
        return 2
    print(f"{'run':>4}  {'best epoch':>10}  {'SRCC':>6}  {'max PLCC':>8}  {'last SRCC':>9}  {'last PLCC':>9}")
    for r in summary["runs"]:
        print(f"{r['run']:>4}  {r['best']['epoch'] + 1:>10}  {r['best']['srcc']:6.4f}  {r['max_plcc']:8.4f}  "
              f"{r['last']['srcc']:9.4f}  {r['last']['plcc']:9.4f}")
    print(f"median over runs: best SRCC {summary['median_best_srcc']:.4f}, "
          f"max PLCC {summary['median_best_plcc']:.4f}; "
          f"last SRCC {summary['median_last_srcc']:.4f} PLCC {summary['median_last_plcc']:.4f}")
    return 0


def _eval(args) -> int:
    from .train import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.model, args.dataset, args.root, args.split, args.crops,
                                     args.batch_size, args.device)
    except (OSError, ValueError) as exc:
        print(f"lifeiqa-fast eval: {exc}", file=sys.stderr)
        return 2
    print(f"{result['images']} images: SRCC {result['srcc']:.4f}  PLCC {result['plcc']:.4f}  KRCC {result['krcc']:.4f}")
    return 0


def _output_problem(path: str) -> str | None:
    """Why the score command could not write its output to path, or None. Checked before scoring, so
    that a typo in --json costs no scoring run; _write_output then writes it."""
    if os.path.isdir(path):
        return "is a folder"
    if os.path.exists(path) and not os.path.isfile(path):  # a device or a pipe: written in place
        return None if os.access(path, os.W_OK) else "is not writable"
    target = os.path.realpath(path)  # through a link, the file it names is the one written
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        return f"its folder {folder} " + ("is not a folder" if os.path.exists(folder) else "does not exist")
    if os.path.exists(target) and not os.access(target, os.W_OK):  # a read-only file is not replaced
        return "is read-only"
    try:  # a file made and removed: os.access lets root write anywhere, even into /proc
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lifeiqa-fast-probe-")
    except OSError as exc:
        return f"cannot create a file in {folder}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(probe)
    return None


def _write_output(path: str, write: Callable[[TextIO], None]) -> None:
    """write(f) to path, atomically: to a temporary file beside it, renamed over it (a failed or
    interrupted write leaves the old file, or none, never half a file). A device or a pipe (/dev/null,
    /dev/stdout, bash's >(jq .)) is written in place: it cannot be renamed over, nor should be."""
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w", newline="") as f:
            write(f)
        return
    target = os.path.realpath(path)
    folder, name = os.path.split(target)
    if os.path.exists(target):  # the replacement keeps the file's permissions
        mode = stat.S_IMODE(os.stat(target).st_mode)
    else:  # as open() would create it (mkstemp makes 0600)
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def _outputs(args) -> list[tuple[str, str, str]] | str:
    """(option, path, format) of each output asked for, or why one cannot be written (checked before
    scoring, so that a typo costs no scoring run)."""
    outputs = [(option, path, option[2:]) for option, path in (("--json", args.json), ("--csv", args.csv)) if path]
    if args.output:
        suffix = os.path.splitext(args.output)[1].lower()
        if suffix not in OUTPUT_FORMATS:
            return f"-o {args.output}: the suffix must be .json or .csv (the output's format), got {suffix or 'none'}"
        outputs.append(("-o", args.output, OUTPUT_FORMATS[suffix][2:]))
    for option, path, _ in outputs:
        why = _output_problem(path)
        if why:
            return f"{option} {path}: {why}"
    return outputs


def _score(args) -> int:
    from . import Scorer
    from .distributed import agree, join, local_device, sharded
    from .images import find_images

    rank, world = join()
    if not args.model:
        print(NO_MODEL.format(command="score"), file=sys.stderr)
        return 2
    problem = None
    if args.batch_size < 1 or args.max_crops < 0:
        problem = f"--batch-size must be positive and --max-crops >= 0, got {args.batch_size}, {args.max_crops}"
    if args.protocol == "official" and args.crops != "grid":
        problem = "--protocol official sets the crops: leave out --crops"
    outputs = _outputs(args) if rank == 0 and problem is None else []
    problem = agree(outputs if isinstance(outputs, str) else problem)  # every process stops, or none
    if problem:
        print(f"lifeiqa-fast score: {problem}", file=sys.stderr)
        return 2
    try:
        files = find_images(args.paths)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not files:
        print("lifeiqa-fast score: no image files found in " + " ".join(args.paths), file=sys.stderr)
        return 2
    crops = "official" if args.protocol == "official" else args.crops
    try:
        scorer = Scorer(args.model, device=args.device or (local_device() if world > 1 else None), dtype=args.dtype,
                        batch_size=args.batch_size, crops=crops, seed=args.seed, resize=args.resize,
                        compile=args.compile, impl=args.impl, progress=rank == 0, dataset=args.dataset,
                        normalize=args.normalize, max_crops=args.max_crops or None)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        print(f"lifeiqa-fast score: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"# model {args.model}; {scorer.scale.describe()}" + ("; normalized to 0..1, higher is better"
                                                                    if args.normalize else ""))
        print(f"# {len(files)} images; crops {scorer.crops}" + (f" (at most {scorer.max_crops})"
                                                               if scorer.crops == "grid" and scorer.max_crops else "")
              + f", resize {scorer.resize or 'none'}, {str(scorer.dtype).replace('torch.', '')}"
              + (f", {world} processes" if world > 1 else ""))
    try:
        results = sharded(files, scorer.score_files)
    except (OSError, ValueError, RuntimeError) as exc:  # out of memory, an implementation that cannot run, ...
        print(f"lifeiqa-fast score: {exc}", file=sys.stderr)
        return 2
    skipped = [r for r in results if r.error is not None]
    if rank != 0:
        return 1 if skipped else 0
    width = max(len(str(r.path)) for r in results)
    for r in results:
        print(f"{str(r.path):<{width}}  {r.score:8.4f}" if r.error is None else f"{str(r.path):<{width}}  skipped")
    scored = [r.score for r in results if r.error is None]
    mean = sum(scored) / len(scored) if scored else None
    if mean is not None:
        print(f"# mean score {mean:.4f} over {len(scored)} images")
    rows = [{"path": str(r.path), "score": r.score, "error": r.error} for r in results]
    report = {"model": str(args.model), "dataset": scorer.dataset, "score_scale": scorer.scale.as_dict(),
              "normalized": scorer.normalize, "score_range": scorer.score_range, "lower_better": scorer.lower_better,
              "crops": scorer.crops, "max_crops": scorer.max_crops, "resize": scorer.resize,
              "dtype": str(scorer.dtype).replace("torch.", ""), "mean_score": mean, "scores": rows}

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=["path", "score", "error"])
        writer.writeheader()
        writer.writerows(rows)

    writers = {"json": lambda f: json.dump(report, f, indent=1), "csv": write_csv}
    for option, path, kind in outputs:
        try:
            _write_output(path, writers[kind])
        except OSError as exc:  # checked before scoring; since then the disk filled, the folder went, ...
            print(f"lifeiqa-fast score: {option} {path}: cannot write: {exc}", file=sys.stderr)
            return 2
    for r in skipped:
        print(r.error, file=sys.stderr)
    if skipped:
        print(f"lifeiqa-fast score: {len(skipped)} of {len(results)} files skipped", file=sys.stderr)
    return 1 if skipped else 0


def _export(args) -> int:
    from .export import export_onnx

    if not args.model:
        print(NO_MODEL.format(command="export"), file=sys.stderr)
        return 2
    batch = args.batch if args.batch == "dynamic" else int(args.batch) if args.batch.isdigit() else args.batch
    try:
        path = export_onnx(args.model, args.onnx, batch=batch)
    except (OSError, ValueError, TypeError, RuntimeError, ModuleNotFoundError) as exc:
        print(f"lifeiqa-fast export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_datasets:
        return _list_datasets()
    if args.command is None:
        parser.error("a command is required (score, train, eval, export, info), or --list-datasets")
    if args.command == "info":
        from .info import format_info, info

        print(format_info(info()))
        return 0
    return {"score": _score, "train": _train, "eval": _eval, "export": _export}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
