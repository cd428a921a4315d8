"""Band specifications and normalization statistics, addressed by band name.

Modalities: "s1" (Sentinel-1 GRD backscatter, dB) and "s2" (Sentinel-2 L2A surface reflectance as stored, DN).
Channel order is the canonical order of `S1_BANDS` / `S2_BANDS` unless a caller asks for a different
selection/order by name.
"""

from __future__ import annotations

import torch

from mmfuse_fast.errors import DataError

S1_BANDS = ("VV", "VH")
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")  # no B10 (cirrus)
MODALITY_BANDS: dict[str, tuple[str, ...]] = {"s1": tuple(S1_BANDS), "s2": tuple(S2_BANDS)}

# Native ground sampling distance in metres. BigEarthNet stores each band at its native resolution over the same
# 1.2 km x 1.2 km footprint: 10 m -> 120 px, 20 m -> 60 px, 60 m -> 20 px.
BAND_RESOLUTION_M: dict[str, int] = {
    "VV": 10, "VH": 10,
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B11": 20, "B12": 20,
}  # fmt: skip

PATCH_SIZE_PX = 120
PATCH_EXTENT_M = 1200

# Per-band (mean, std) of the BigEarthNet v2 (reBEN) official train split, bands upsampled to 120 x 120 with
# bilinear interpolation. Source: the "120_bilinear" tables in configilm 0.7 `configilm/extra/BENv2_utils.py`
# (the library behind reBEN, Clasen et al. 2024); its S1 statistics are those of BigEarthNet v1-S1. configilm
# resamples with align_corners=True and we use align_corners=False; the difference in these statistics is far
# below their precision for normalization. S1 values are dB, S2 values are L2A DN as stored (no offset).
BAND_STATS: dict[str, dict[str, tuple[float, float]]] = {
    "s1": {
        "VV": (-12.643863677978516, 5.133493900299072),
        "VH": (-19.352558135986328, 5.590505599975586),
    },
    "s2": {
        "B01": (360.64678955078125, 563.1734008789062),
        "B02": (438.3720703125, 607.02685546875),
        "B03": (614.0556640625, 603.2968139648438),
        "B04": (588.4096069335938, 684.56884765625),
        "B05": (942.7476806640625, 727.5784301757812),
        "B06": (1769.8486328125, 1087.4288330078125),
        "B07": (2049.475830078125, 1261.4302978515625),
        "B08": (2193.2919921875, 1369.3717041015625),
        "B8A": (2235.48681640625, 1342.490478515625),
        "B09": (2241.10595703125, 1294.35546875),
        "B11": (1568.2115478515625, 1063.9197998046875),
        "B12": (997.715087890625, 806.8846435546875),
    },
}


def native_size_px(band: str) -> int:
    """Side length in pixels of a BigEarthNet patch stored at the band's native resolution."""
    return PATCH_EXTENT_M // BAND_RESOLUTION_M[band]


def compute_band_stats(dataset, modality: str) -> dict[str, tuple[float, float]]:
    """Per-band (mean, std) over every pixel of every sample of `dataset` for one modality.

    `dataset` must yield physical values (built with normalize=False). The result has the shape of `BAND_STATS[m]`
    and can be passed back as `stats={modality: result}` to a reader.
    """
    if getattr(dataset, "normalize", False):
        raise ValueError("compute_band_stats needs a dataset built with normalize=False (physical values)")
    band_names = dataset.bands[modality]
    # float64 sums: a full BigEarthNet pass is ~10^10 pixels per band, too many for float32 accumulation.
    total = torch.zeros(len(band_names), dtype=torch.float64)
    total_sq = torch.zeros(len(band_names), dtype=torch.float64)
    count = 0
    for index in range(len(dataset)):
        image = torch.as_tensor(dataset[index][modality]).to(torch.float64).flatten(1)
        total += image.sum(dim=1)
        total_sq += (image * image).sum(dim=1)
        count += image.shape[1]
    if count == 0:
        raise DataError("compute_band_stats: the dataset is empty")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return {band: (float(m), float(s)) for band, m, s in zip(band_names, mean, std)}
