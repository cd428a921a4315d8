"""The `mmfuse` command: pretrain | finetune | evaluate.

    mmfuse pretrain --config tiny --run-dir runs/pt [--set train.steps=50 ...] [--resume]
    mmfuse finetune [--config FILE] --run-dir runs/ft --pretrained runs/pt [--set label_fraction=0.01] [--resume]
    mmfuse evaluate --run-dir runs/ft [--split test] [--data-root PATH]

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

    p = sub.add_parser("finetune", help="multi-label linear probe / fine-tuning on a pretrained run")
    _add_config_args(p, "YAML path of a FinetuneConfig (default: the built-in defaults)")
    p.add_argument("--pretrained", default=None, help="pretraining run dir or .safetensors (= --set pretrained=PATH)")

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned classifier on a split")
    p.add_argument("--run-dir", required=True, help="fine-tuning run directory or checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--data-root", default=None, help="dataset root (default: the one in the run's config)")
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
            cfg = _resolve_config(PretrainConfig, args, "tiny")
            from mmfuse_fast.engine.pretrain import pretrain

            result = pretrain(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
        elif args.command == "finetune":
            if args.pretrained:
                args.overrides = [f"pretrained={args.pretrained}", *args.overrides]
            cfg = _resolve_config(FinetuneConfig, args, None)
            from mmfuse_fast.engine.finetune import finetune

            result = finetune(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
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
    print(json.dumps(_summary(result), indent=1, default=str))
    return 0


def _summary(result: dict) -> dict:
    """The printed result, without the long per-class lists."""
    out = {k: v for k, v in result.items() if k != "ap_per_class"}
    if isinstance(out.get("eval"), dict):
        out["eval"] = {k: v for k, v in out["eval"].items() if k != "ap_per_class"}
    return out


if __name__ == "__main__":
    sys.exit(main())
