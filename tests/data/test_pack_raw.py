"""The fast packed path: raw stored values through the loader, normalized on the device, equal the host-normalized
batches bit for bit."""

import pytest
import torch

from mmfuse_fast.data import PackedDataset, pack_dataset
from mmfuse_fast.data.loader import SharedBatchLoader
from mmfuse_fast.data.synthetic import write_bigearthnet_v1, write_seg_tiles, write_sen12ms
from mmfuse_fast.engine.data import DeviceNormalize
from mmfuse_fast.engine.step import forbid_host_sync
from mmfuse_fast.errors import ConfigError, DataError

pytest.importorskip("rasterio")  # the synthetic datasets are GeoTIFFs
pytest.importorskip("lmdb")


def assert_device_normalized_equals_host(packed: PackedDataset, device="cpu", batch_size=3):
    raw = packed.raw_values()
    normalize = DeviceNormalize.for_dataset(raw, device)
    host = list(SharedBatchLoader(packed, batch_size))
    shipped = list(SharedBatchLoader(raw, batch_size))
    assert len(host) == len(shipped)
    for expected, batch in zip(host, shipped):
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        got = normalize(on_device)
        assert got["id"] == expected["id"]
        for m in packed.modalities:
            assert got[m].dtype == torch.float32 and torch.equal(got[m].cpu(), expected[m]), m
        assert torch.equal(got["label"].cpu(), expected["label"])
    return shipped


def test_raw_float_values_with_nodata_normalized_on_the_device_equal_the_host(tmp_path):
    seg = write_seg_tiles(tmp_path / "seg", n=5, size=16, nodata_tile=1)
    pack_dataset("seg_tiles", seg, tmp_path / "packed", options={"num_classes": 5}, progress=False)
    shipped = assert_device_normalized_equals_host(PackedDataset(tmp_path / "packed", split="all"))
    assert torch.isnan(torch.cat([b["rgb"] for b in shipped])).any()  # nodata travels as NaN, becomes 0 on device
    picked = PackedDataset(tmp_path / "packed", split="all", modalities=["sar", "rgb"],
                           bands={"rgb": ["rgb_2", "rgb_0"]})
    assert_device_normalized_equals_host(picked)


def test_integer_storage_ships_half_the_bytes_and_the_same_numbers(tmp_path):
    sen = write_sen12ms(tmp_path / "sen", size=16)
    pack_dataset("sen12ms", sen, tmp_path / "f32", progress=False)
    pack_dataset("sen12ms", sen, tmp_path / "u16", dtype={"s2": "uint16"}, progress=False)
    exact = PackedDataset(tmp_path / "f32")
    packed = PackedDataset(tmp_path / "u16")
    for i in range(len(exact)):
        assert torch.equal(exact[i]["s2"], packed[i]["s2"]) and torch.equal(exact[i]["s1"], packed[i]["s1"])
    raw = packed.raw_values()[0]
    assert raw["s2"].dtype == torch.uint16 and raw["s1"].dtype == torch.float32
    assert raw["s2"].nbytes * 2 == exact[0]["s2"].nbytes
    assert_device_normalized_equals_host(packed)


def test_bfloat16_grid_pack_of_bigearthnet(tmp_path):
    ben = write_bigearthnet_v1(tmp_path / "ben", n=5)
    pack_dataset("bigearthnet_v1", ben, tmp_path / "bf16", grid=True, dtype="bfloat16", progress=False)
    packed = PackedDataset(tmp_path / "bf16", split="all")
    assert packed.raw_values()[0]["s2"].dtype == torch.bfloat16
    assert_device_normalized_equals_host(packed)


def test_integer_storage_refuses_values_it_cannot_hold(tmp_path):
    seg = write_seg_tiles(tmp_path / "seg", n=2, size=16)
    with pytest.raises(DataError, match=r"sample tile_000 \w+: .*uint16 cannot hold"):
        pack_dataset("seg_tiles", seg, tmp_path / "packed", options={"num_classes": 5}, dtype="uint16",
                     progress=False)
    with pytest.raises(ConfigError, match="modality 'hsi'"):
        pack_dataset("seg_tiles", seg, tmp_path / "packed", options={"num_classes": 5}, dtype={"hsi": "uint16"},
                     progress=False)
    ben = write_bigearthnet_v1(tmp_path / "ben", n=2)
    with pytest.raises(ConfigError, match="needs the grid layout"):
        pack_dataset("bigearthnet_v1", ben, tmp_path / "ben_packed", dtype="bfloat16", progress=False)


def test_raw_values_need_a_normalizing_reader(tmp_path):
    seg = write_seg_tiles(tmp_path / "seg", n=2, size=16)
    pack_dataset("seg_tiles", seg, tmp_path / "packed", options={"num_classes": 5}, progress=False)
    with pytest.raises(ConfigError, match="normalize=False"):
        PackedDataset(tmp_path / "packed", normalize=False).raw_values()
    assert DeviceNormalize.for_dataset(PackedDataset(tmp_path / "packed", normalize=False), "cpu") is None


def test_device_normalize_reads_nothing_on_the_host():
    normalize = DeviceNormalize({"s2": {"a": (1.0, 2.0), "b": (3.0, 0.0)}}, {"s2": ["a", "b"]}, "cpu")
    x = torch.tensor([[[[1.0, float("nan")]], [[5.0, float("inf")]]]])
    with forbid_host_sync():
        out = normalize({"s2": x, "label": torch.ones(1)})
    assert torch.equal(out["s2"], torch.tensor([[[[0.0, 0.0]], [[2.0, 0.0]]]]))  # std 0 divides by 1


@pytest.mark.gpu
def test_device_normalize_inside_a_cuda_graph(tmp_path):
    seg = write_seg_tiles(tmp_path / "seg", n=6, size=16, nodata_tile=4)
    pack_dataset("seg_tiles", seg, tmp_path / "packed", options={"num_classes": 5}, progress=False)
    packed = PackedDataset(tmp_path / "packed", split="all")
    raw = packed.raw_values()
    normalize = DeviceNormalize.for_dataset(raw, "cuda")
    host = list(SharedBatchLoader(packed, 3))
    shipped = list(SharedBatchLoader(raw, 3))
    static = {m: shipped[0][m].cuda() for m in packed.modalities}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        normalize(static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = normalize(static)
    for expected, batch in zip(host, shipped):
        for m in packed.modalities:
            static[m].copy_(batch[m], non_blocking=True)
        graph.replay()
        for m in packed.modalities:
            assert torch.equal(out[m].cpu(), expected[m]), m
