"""`mmfuse predict`: a fine-tuned segmentation model over GeoTIFF inputs -> a GeoTIFF class map + a PNG preview.

Inputs are addressed by modality ({"s2": "a.tif", "s1": "b.tif"}; a single unnamed input goes to a one-modality
model). Bands are picked by name from the file's band descriptions when they name every band the model needs,
else the file must have exactly the model's band count, in the model's order. The first input defines the output
grid; the others must have the same CRS and footprint and are resampled (bilinear) onto it when their size differs.
Values are normalized with the statistics saved by the fine-tuning run (task.json), rasters of any size are
covered by overlapping sliding windows (logits averaged), and pixels that are nodata in every band of any input are
written as nodata. The class map keeps the input's CRS, transform and nodata value and holds label values as the
training labels use them (class k is written as k + 1 when the run was trained with `reduce_zero_label`), with a
colour table and the class names in its metadata (dtype uint8 or uint16 when the values and the nodata value fit,
else int16/int32, which GeoTIFF gives no colour table). The preview is the same map with a legend of class names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mmfuse_fast.data.geotiff import (DataFileError, check_same_grid, default_band_names, nan_nodata, read_raster,
                                      resample)
from mmfuse_fast.errors import UsageError

__all__ = ["predict", "parse_inputs", "PALETTE", "write_preview"]

# tab20-like distinct colours; class k uses PALETTE[k % len(PALETTE)], nodata is black
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
    (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141),
    (158, 218, 229)], dtype=np.uint8)


def parse_inputs(items: Sequence[str]) -> dict[str, str] | list[str]:
    """["s2=a.tif", "s1=b.tif"] -> {"s2": "a.tif", "s1": "b.tif"}; ["a.tif"] -> ["a.tif"]."""
    named = [i for i in items if "=" in i and not Path(i).exists()]
    if named and len(named) != len(items):
        raise UsageError("--input: name every input (MODALITY=PATH) or none")
    if not named:
        return list(items)
    out = {}
    for item in items:
        m, path = item.split("=", 1)
        if m in out:
            raise UsageError(f"--input: modality {m!r} given twice")
        out[m] = path
    return out


def write_preview(path: str | os.PathLike, classes: np.ndarray, invalid: np.ndarray, names: Sequence[str],
                  values: Sequence[int]) -> Path:
    """The class map in the palette's colours (nodata black) with a legend "value: name" for every class."""
    from matplotlib.patches import Patch

    from mmfuse_fast.engine.plots import pyplot

    plt = pyplot()
    rgb = PALETTE[classes % len(PALETTE)]
    rgb[invalid] = 0
    h, w = classes.shape
    scale = max(1.0, 256 / min(h, w))  # tiny tiles stay readable; large scenes keep one pixel per pixel
    fig_w, fig_h = w * scale / 100, h * scale / 100
    fig = plt.figure(figsize=(fig_w + 2.2, max(fig_h, 0.25 * len(names) + 0.5)), dpi=100)
    ax = fig.add_axes((0, 0, fig_w / (fig_w + 2.2), 1))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    handles = [Patch(color=PALETTE[k % len(PALETTE)] / 255, label=f"{value}: {name}")
               for k, (value, name) in enumerate(zip(values, names))]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _band_indexes(info, names: Sequence[str], modality: str) -> list[int]:
    file_names = default_band_names(info)
    if all(n in file_names for n in names):
        return [file_names.index(n) + 1 for n in names]
    if info.count == len(names):
        return list(range(1, len(names) + 1))
    raise DataFileError(f"{info.path}: the model's {modality!r} input needs {len(names)} bands {list(names)[:4]}...; "
                        f"the file has {info.count} bands and its band descriptions do not name them all")


def _output_dtype(low: int, high: int, nodata) -> str:
    """The smallest dtype holding the label values low..high and the nodata value, which must not be one of them."""
    values = [low, high] + ([] if nodata is None else [nodata])
    if nodata is not None and (not float(nodata).is_integer() or low <= nodata <= high):
        return "float32"
    for dtype in ("uint8", "uint16", "int16", "int32"):
        info = np.iinfo(dtype)
        if info.min <= min(values) and max(values) <= info.max:
            return dtype
    return "float32"


@torch.no_grad()
def predict(run_dir: str | os.PathLike, inputs: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
            out_dir: str | os.PathLike, stride: int | None = None, batch_size: int = 16,
            device: str | torch.device = "cpu", name: str | None = None) -> dict:
    """Runs the fine-tuned segmentation model of `run_dir` over the inputs; writes `<name>_classes.tif` and
    `<name>_preview.png` into `out_dir` (name: the first input's file stem). Returns their paths and counts."""
    import rasterio

    from mmfuse_fast.engine.rundir import read_task_info
    from mmfuse_fast.engine.tasks import load_classifier
    from mmfuse_fast.models.segmentation import sliding_window_logits

    model, run_dir, cfg = load_classifier(run_dir, device)
    info = read_task_info(run_dir)
    if info["task"] != "segmentation":
        raise UsageError(f"{run_dir} is a {info['task']!r} run; predict writes class maps of segmentation runs")
    modalities = model.modalities
    if not isinstance(inputs, Mapping):
        inputs = list(inputs)
        if len(inputs) != len(modalities):
            raise UsageError(f"the model takes modalities {list(modalities)}: pass one input per modality, named "
                             f"MODALITY=PATH")
        if len(inputs) > 1:
            raise UsageError(f"the model takes several modalities {list(modalities)}: name the inputs "
                             f"(MODALITY=PATH)")
        inputs = {modalities[0]: inputs[0]}
    missing = [m for m in modalities if m not in inputs]
    extra = [m for m in inputs if m not in modalities]
    if missing or extra:
        raise UsageError(f"the model takes modalities {list(modalities)}; got inputs for {list(inputs)}")
    for path in inputs.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"input GeoTIFF not found: {path}")
    stats = info.get("stats") or {}
    first = next(iter(inputs))
    ref = None
    images, invalid = {}, None
    for m, path in inputs.items():
        from mmfuse_fast.data.geotiff import raster_info

        meta = raster_info(path)
        names = model.backbone.bands[m]
        array, meta = read_raster(path, _band_indexes(meta, names, m))
        if ref is None:
            ref = meta
        else:
            check_same_grid(meta, ref, allow_resample=True)
        x = resample(nan_nodata(array, meta.nodata), ref.shape, "bilinear")
        void = ~np.isfinite(x).any(0)
        invalid = void if invalid is None else invalid | void
        if m in stats:
            mean = np.array([stats[m][b][0] for b in names], np.float32).reshape(-1, 1, 1)
            std = np.array([stats[m][b][1] for b in names], np.float32).reshape(-1, 1, 1)
            x = (x - mean) / np.where(std > 0, std, 1).astype(np.float32)
        images[m] = torch.from_numpy(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))[None]
    images = {m: images[m].to(device) for m in modalities}
    logits = sliding_window_logits(model, images, model.img_size, info["num_classes"], stride or cfg.eval_stride or None,
                                   batch_size)
    classes = logits[0].argmax(0).cpu().numpy()
    num_classes = info["num_classes"]
    offset = int(info.get("label_offset", 0))
    values = list(range(offset, offset + num_classes))
    names = list(info.get("classes") or [f"class_{k}" for k in range(num_classes)])
    dtype = _output_dtype(values[0], values[-1], ref.nodata)
    out = (classes + offset).astype(dtype)
    if ref.nodata is not None:
        out[invalid] = ref.nodata
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or Path(inputs[first]).stem
    tif_path, png_path = out_dir / f"{stem}_classes.tif", out_dir / f"{stem}_preview.png"
    tmp = tif_path.with_name(tif_path.name + ".tmp")
    with rasterio.open(tmp, "w", driver="GTiff", height=out.shape[0], width=out.shape[1], count=1, dtype=dtype,
                       crs=ref.crs, transform=ref.transform, nodata=ref.nodata, compress="deflate") as dst:
        dst.write(out, 1)
        dst.set_band_description(1, "class")
        dst.update_tags(1, **{f"CLASS_{value}": class_name for value, class_name in zip(values, names)})
        if dtype in ("uint8", "uint16"):  # GeoTIFF stores a colour table only for these
            dst.write_colormap(1, {value: (*map(int, PALETTE[k % len(PALETTE)]), 255)
                                   for k, value in enumerate(values)})
    os.replace(tmp, tif_path)
    write_preview(png_path, classes, invalid, names, values)
    counts = np.bincount(classes[~invalid].ravel(), minlength=num_classes).tolist()
    return {"class_map": str(tif_path), "preview": str(png_path), "shape": list(out.shape), "dtype": dtype,
            "nodata": ref.nodata, "nodata_pixels": int(invalid.sum()), "class_counts": counts,
            "classes": names, "label_values": values}
