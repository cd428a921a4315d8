"""The `mmfuse` command: pretrain | finetune | evaluate | predict | data.

    mmfuse pretrain --config tiny --run-dir runs/pt [--set train.steps=50 ...] [--resume]
    mmfuse finetune [--config FILE] --run-dir runs/ft --pretrained runs/pt [--set label_fraction=0.01] [--resume]
    mmfuse evaluate --run-dir runs/ft [--split test] [--data-root PATH] [--json]
    mmfuse predict --run-dir runs/ft --input s2=a.tif --input s1=b.tif --out DIR [--stride 64]
    mmfuse data pack --format {bigearthnet_v1,sen12ms,seg_tiles} --root DATA --out PACKED [--option key=value]
                     [--grid] [--dtype [MODALITY=]{float32,bfloat16,uint16,int16}] [--overwrite] [--verify]
    mmfuse experiment run --spec paper --scale tiny --out DIR [--seeds N] [--only table2 ...]
                          [--launcher inline|torchrun|print] [--set KEY=VALUE | TABLE:KEY=VALUE ...]
    mmfuse experiment report DIR

Every error a user can cause (`mmfuse_fast.errors.MMFuseError` and its subclasses, and a path that is missing, not
accessible or of the wrong kind) prints one line and exits with the error's status: 2 for a config or data problem
(the line names the key, file or split), 1 for run state (a run directory that already holds a run without
--resume or that another run is using, a broken checkpoint, a pack that fails verification), 130 for Ctrl-C.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmfuse_fast.config import FinetuneConfig, PretrainConfig, load_config
from mmfuse_fast.errors import ConfigError, Interrupted, MMFuseError, UsageError

EXIT_MISSING_FILE = 2
# a path named by the user that does not exist, may not be read or written, or is a file where a folder is expected
USER_PATH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


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
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
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
    p.add_argument("--out", required=True, help="output folder, apart from --root (written as OUT.partial beside "
                                                 "it, swapped in when verified; OUT.lock: one packer at a time)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, value parsed as YAML, e.g. --option 'modalities={hsi: images}' "
                        "--option reduce_zero_label=true (repeatable)")
    p.add_argument("--grid", action="store_true", help="bigearthnet_v1: store the bands resampled to the 120 px "
                                                       "grid, one array per modality (read by data.dataset=packed; "
                                                       "the other formats always are)")
    p.add_argument("--dtype", dest="dtypes", action="append", default=[], metavar="[MODALITY=]DTYPE",
                   help="how grid packs store the values, for every modality or one (repeatable): float32 (the "
                        "default: exact), bfloat16 (half the bytes, rounded), uint16 or int16 (exact, for integer "
                        "data only), e.g. --dtype s2=uint16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack (of any data) once the new "
                                                            "one verifies; discard an unfinished pack of other data")
    p.add_argument("--verify", action="store_true", help="only verify an existing pack (counts and checksums)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("experiment", help="reproduce a set of tables (the paper's by default): run a sweep, report")
    exp_sub = p.add_subparsers(dest="experiment_command", required=True)
    p = exp_sub.add_parser("run", help="plan, run (resumable: finished cells are skipped) and report a sweep")
    p.add_argument("--spec", default="paper", help="built-in spec name (paper) or YAML path")
    p.add_argument("--scale", required=True, help="a scale of the spec (paper: tiny, small, base)")
    p.add_argument("--out", required=True, help="sweep directory (runs, configs, plan, report)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per cell (mean ± std in the report)")
    p.add_argument("--only", nargs="+", default=None, metavar="TABLE", help="only these tables of the spec")
    p.add_argument("--launcher", default="inline", help="inline (default) | torchrun | print")
    p.add_argument("--nproc", type=int, default=None, help="torchrun: processes per pretraining run (default: GPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[TABLE:]KEY=VALUE",
                   help="override a config key of every run (or of one table's runs), e.g. --set data.root=PATH")
    p = exp_sub.add_parser("report", help="DIR/report.md, DIR/results.csv and plots from whatever has finished")
    p.add_argument("out", help="sweep directory")
    return parser


def _resolve_config(cls, args, default: str | None):
    config = args.config
    from mmfuse_fast.engine.rundir import CONFIG_NAME

    if config is None and args.resume and (Path(args.run_dir) / CONFIG_NAME).is_file():
        config = str(Path(args.run_dir) / CONFIG_NAME)
    if config is None:
        config = default
    return load_config(cls, config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"data": "data pack", "experiment": f"experiment {getattr(args, 'experiment_command', '')}"}.get(
        args.command, args.command)
    try:
        result = _run(args)
    except MMFuseError as e:
        return _fail(command, e, e.exit_code)
    except USER_PATH_ERRORS as e:  # a config, checkpoint, data file or output folder named by the user
        return _fail(command, e, EXIT_MISSING_FILE)
    except KeyboardInterrupt:
        return _fail(command, "interrupted", Interrupted.exit_code)
    if result.get("rank", 0) == 0:  # torchrun: one summary, from rank 0
        if args.command == "evaluate" and not args.json:
            print(format_metrics_table(result))
        else:
            print(json.dumps(_summary(result), indent=1, default=str))
    return int(result.get("exit_code", 0))  # 128 + signal when SIGTERM/SIGINT stopped pretraining early


def _fail(command: str, error, exit_code: int) -> int:
    message = " ".join(str(error).split()) or type(error).__name__  # one line, however the message was wrapped
    print(f"mmfuse {command}: error: {message}", file=sys.stderr)
    return exit_code


def _run(args) -> dict:
    # engine modules are imported here, not at the top: `mmfuse --help` and config errors stay fast
    if args.command == "pretrain":
        if args.compile:
            args.overrides = [*args.overrides, "train.compile=true"]
        cfg = _resolve_config(PretrainConfig, args, "tiny")
        from mmfuse_fast.engine.pretrain import pretrain

        return pretrain(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
    if args.command == "finetune":
        if args.pretrained:
            args.overrides = [f"pretrained={args.pretrained}", *args.overrides]
        cfg = _resolve_config(FinetuneConfig, args, None)
        from mmfuse_fast.engine.finetune import finetune

        return finetune(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
    if args.command == "predict":
        from mmfuse_fast.engine.predict import parse_inputs, predict

        return predict(args.run_dir, parse_inputs(args.input), args.out, stride=args.stride, device=args.device)
    if args.command == "data":
        return _data_pack(args)
    if args.command == "experiment":
        from mmfuse_fast.experiment import run_experiment, write_report

        if args.experiment_command == "report":
            return write_report(args.out)
        return run_experiment(args.spec, args.scale, args.out, seeds=args.seeds, only=args.only,
                              launcher=args.launcher, overrides=args.overrides, nproc=args.nproc,
                              log=lambda line: print(line, file=sys.stderr))
    from mmfuse_fast.engine.evaluate import evaluate

    return evaluate(args.run_dir, split=args.split, data_root=args.data_root, progress=not args.no_progress)


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
    per_modality = dict(text.split("=", 1) for text in args.dtypes if "=" in text)
    for_all = [text for text in args.dtypes if "=" not in text]
    if len(for_all) > 1 or (for_all and per_modality):
        raise UsageError(f"--dtype {' --dtype '.join(args.dtypes)}: give one DTYPE for every modality, or "
                         f"MODALITY=DTYPE for some (the others stay float32), not both")
    return pack_dataset(args.format, args.root, args.out, options=options, overwrite=args.overwrite,
                        progress=not args.no_progress, grid=args.grid,
                        dtype=for_all[0] if for_all else per_modality or "float32")


PER_CLASS_KEYS = ("ap_per_class", "iou_per_class", "f1_per_class")


def _summary(result: dict) -> dict:
    """The printed result, without the long per-class lists."""
    out = {k: v for k, v in result.items() if k not in PER_CLASS_KEYS}
    if isinstance(out.get("eval"), dict):
        out["eval"] = {k: v for k, v in out["eval"].items() if k not in PER_CLASS_KEYS}
    return out


def _format_value(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"  # NaN: e.g. a metric over classes none of which has a positive sample
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_metrics_table(result: dict) -> str:
    """The evaluation result as a two-column table of its scalar entries (in the result's order); the per-class
    dicts are summarized in one line each (their values are in the run's metrics_<split>.json and in --json)."""
    rows = [(k, _format_value(v)) for k, v in result.items() if v is None or isinstance(v, (str, int, float))]
    per_class = [(k, v) for k, v in result.items() if isinstance(v, dict)]
    width = max([len("metric"), *(len(k) for k, _ in rows)])
    lines = [f"{'metric':<{width}}  value", "-" * (width + 2 + max([5, *(len(v) for _, v in rows if len(v) < 20)]))]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    for key, values in per_class:
        lines.append(f"{key}: {len(values)} classes (metrics_{result.get('split', '<split>')}.json in the run "
                     f"directory lists them)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
