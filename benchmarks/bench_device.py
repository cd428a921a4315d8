"""Device facts and measured ceilings: what every other benchmark's figures are a fraction of.

    python benchmarks/bench_device.py                # facts + ceilings of the default device into <results>/facts.json
    python benchmarks/bench_device.py --dry-run      # the same on the CPU at tiny sizes

Facts: the device (name, capability, SMs, memory; driver, clocks and power limit from nvidia-smi), the versions
(Python, torch, CUDA, cuDNN, Triton, numpy, torchvision, flash_attn) and which attention backends exist (FlexAttention,
its FLASH backend, flash_attn). Ceilings: bf16 and TF32 GEMM TFLOP/s (8192³ matmuls) and copy bandwidth in TB/s (a
2 GiB device-to-device copy, bytes read + written), next to the vendor's dense bf16 and bandwidth figures. The last
printed line is the JSON written.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (CEILINGS_FILE, SPEC_BANDWIDTH_GBPS, SPEC_BF16_TFLOPS, add_common_args, ceilings,  # noqa: E402
                   device_name, results_dir, spec_value)


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "present")
    except Exception:  # noqa: BLE001 - absent or broken: either way not usable here
        return None


def _nvidia_smi() -> dict:
    fields = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pstate"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"nvidia_smi": f"unavailable: {error}"}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")] if out.stdout.strip() else []
    return {f"smi_{k.replace('.', '_')}": v for k, v in zip(fields.split(","), values)}


def facts(device: torch.device) -> dict:
    result = {"device": device_name(device), "python": platform.python_version(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "triton": _version("triton"), "numpy": _version("numpy"),
              "torchvision": _version("torchvision"), "flash_attn": _version("flash_attn"),
              "flash_attn_cute": importlib.util.find_spec("flash_attn") is not None
              and importlib.util.find_spec("flash_attn.cute") is not None,
              "flex_attention": importlib.util.find_spec("torch.nn.attention.flex_attention") is not None,
              "rasterio": _version("rasterio"), "lmdb": _version("lmdb")}
    from torch.utils.cpp_extension import CUDA_HOME

    result.update(nvcc=shutil.which("nvcc"), cuda_home=CUDA_HOME, ninja=shutil.which("ninja"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                      spec_bf16_tflops=spec_value(SPEC_BF16_TFLOPS, result["device"]),
                      spec_bandwidth_gbps=spec_value(SPEC_BANDWIDTH_GBPS, result["device"]))
        result.update(_nvidia_smi())
    else:
        result["cpu_threads"] = torch.get_num_threads()
    try:
        from mmfuse_fast.ops import _extension

        result["extension"] = "loaded" if _extension.AVAILABLE else f"not loaded: {_extension.LOAD_ERROR}"
        result["extension_cuda_kernel"] = _extension.has_kernel("crop_resize", "cuda")
    except Exception as error:  # noqa: BLE001 - the facts are written even when the package does not import
        result["extension"] = f"package import failed: {error!r}"
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    out = results_dir(args.out)
    path = out / CEILINGS_FILE
    if path.exists():
        path.unlink()  # facts are of this session: a stale file of another machine would be read as this one's
    measured = ceilings(device, out, small=args.dry_run)
    result = {"facts": facts(device), "ceilings": measured}
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
