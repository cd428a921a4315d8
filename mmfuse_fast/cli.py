"""The `mmfuse` command: pretrain | finetune | evaluate | predict | data.

    mmfuse pretrain --config tiny --run-dir runs/pt [--set train.steps=50 ...] [--resume]
    mmfuse finetune [--config FILE] --run-dir runs/ft --pretrained runs/pt [--set label_fraction=0.01] [--resume]
    mmfuse evaluate --run-dir runs/ft [--split test] [--data-root PATH]
    mmfuse predict --run-dir runs/ft --input s2=a.tif --input s1=b.tif --out DIR [--stride 64]
    mmfuse data pack --format {bigearthnet_v1,sen12ms,seg_tiles} --root DATA --out PACKED [--option key=value]

Config problems (unknown key, wrong type, missing file) print one line naming the key and exit with status 2;
a run directory that already holds a run (without --resume) or a broken checkpoint exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmfuse_fast.config import ConfigError, FinetuneConfig, PretrainConfig, load_config

EXIT_CONFIG = 2
EXIT_RUN = 1


def _add_config_args(p: argparse.ArgumentParser, config_help: str) -> None:
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--run-dir", required=True, help="output directory of the run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=50 (repeatable; value parsed as YAML)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description="Multimodal remote-sensing pretraining engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="self-supervised pretraining")
    _add_config_args(p, "built-in config name (tiny, small, base) or YAML path; default: tiny; on --resume "
                        "without --config, the run's own config.yaml")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (= --set train.compile=true)")

    p = sub.add_parser("finetune", help="linear probe / fine-tuning (multilabel, scene, segmentation) on a pretrained run")
    _add_config_args(p, "YAML path of a FinetuneConfig (default: the built-in defaults)")
    p.add_argument("--pretrained", default=None, help="pretraining run dir or .safetensors (= --set pretrained=PATH)")

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned run on a split")
    p.add_argument("--run-dir", required=True, help="fine-tuning run directory or checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--data-root", default=None, help="dataset root (default: the one in the run's config)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("predict", help="GeoTIFF class map (+ PNG preview) from a fine-tuned segmentation run")
    p.add_argument("--run-dir", required=True, help="fine-tuning run directory or checkpoint")
    p.add_argument("--input", action="append", required=True, metavar="[MODALITY=]PATH",
                   help="input GeoTIFF of one modality (repeatable; unnamed only for a one-modality model)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride in px (default: half a window)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("pack", help="GeoTIFF dataset -> LMDB + safetensors + metadata.parquet (resumable, "
                                         "verified)")
    p.add_argument("--format", required=True, choices=["bigearthnet_v1", "sen12ms", "seg_tiles"])
    p.add_argument("--root", required=True, help="dataset root in the distributed layout")
    p.add_argument("--out", required=True, help="output folder (written as OUT.partial, renamed when verified)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, value parsed as YAML, e.g. --option 'modalities={hsi: images}' "
                        "--option reduce_zero_label=true (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack")
    p.add_argument("--verify", action="store_true", help="only verify an existing pack (counts and checksums)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def _resolve_config(cls, args, default: str | None):
    config = args.config
    if config is None and args.resume and (Path(args.run_dir) / "config.yaml").is_file():
        config = str(Path(args.run_dir) / "config.yaml")
    if config is None:
        config = default
    return load_config(cls, config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # imported late: `mmfuse --help` and config errors stay fast
    from mmfuse_fast.engine.checkpoint import CheckpointError
    from mmfuse_fast.engine.runtime import RunDirError

    try:
        if args.command == "pretrain":
            if args.compile:
                args.overrides = [*args.overrides, "train.compile=true"]
            cfg = _resolve_config(PretrainConfig, args, "tiny")
            from mmfuse_fast.engine.pretrain import pretrain

            result = pretrain(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
        elif args.command == "finetune":
            if args.pretrained:
                args.overrides = [f"pretrained={args.pretrained}", *args.overrides]
            cfg = _resolve_config(FinetuneConfig, args, None)
            from mmfuse_fast.engine.finetune import finetune

            result = finetune(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
        elif args.command == "predict":
            from mmfuse_fast.engine.predict import parse_inputs, predict

            result = predict(args.run_dir, parse_inputs(args.input), args.out, stride=args.stride,
                             device=args.device)
        elif args.command == "data":
            result = _data_pack(args)
        else:
            from mmfuse_fast.engine.evaluate import evaluate

            result = evaluate(args.run_dir, split=args.split, data_root=args.data_root,
                              progress=not args.no_progress)
    except (ConfigError, FileNotFoundError) as e:
        print(f"mmfuse {args.command}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (RunDirError, CheckpointError) as e:
        print(f"mmfuse {args.command}: error: {e}", file=sys.stderr)
        return EXIT_RUN
    except ValueError as e:  # bad data (a DataFileError names the file) or bad arguments
        if args.command not in ("predict", "data"):
            raise
        print(f"mmfuse {args.command}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except RuntimeError as e:
        from mmfuse_fast.data.pack import PackError

        if not isinstance(e, PackError):
            raise
        print(f"mmfuse {args.command}: error: {e}", file=sys.stderr)
        return EXIT_RUN
    if result.get("rank", 0) == 0:  # torchrun: one summary, from rank 0
        print(json.dumps(_summary(result), indent=1, default=str))
    return int(result.get("exit_code", 0))  # 128 + signal when SIGTERM/SIGINT stopped pretraining early


def _data_pack(args) -> dict:
    from mmfuse_fast.config import parse_override
    from mmfuse_fast.data.pack import pack_dataset, verify_pack

    if args.verify:
        return verify_pack(args.out)
    options = {}
    for text in args.options:
        try:
            key, value = parse_override(text)
        except ConfigError as e:
            raise ConfigError(str(e).replace("--set", "--option")) from None
        options[key] = value
    try:
        return pack_dataset(args.format, args.root, args.out, options=options, overwrite=args.overwrite,
                            progress=not args.no_progress)
    except TypeError as e:  # an option the reader does not take
        raise ConfigError(f"--option: {e}") from None


def _summary(result: dict) -> dict:
    """The printed result, without the long per-class lists."""
    long = ("ap_per_class", "iou_per_class", "f1_per_class")
    out = {k: v for k, v in result.items() if k not in long}
    if isinstance(out.get("eval"), dict):
        out["eval"] = {k: v for k, v in out["eval"].items() if k not in long}
    return out


if __name__ == "__main__":
    sys.exit(main())
