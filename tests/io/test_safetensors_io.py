from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge.errors import FormatError, PlanError
from merge.io import load_state_dict, open_checkpoint, save_state_dict
from merge.io.writer import parse_size

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for d in ALL_DTYPES:
        x = torch.randn(5, 7, generator=g) * 10
        out[f"t.{str(d).replace('torch.', '')}"] = x > 0 if d == torch.bool else x.to(d)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


@pytest.mark.parametrize("shard_size", [10**9, 300])
def test_round_trip_all_dtypes(tmp_path: Path, shard_size: int) -> None:
    d = sample()
    out = save_state_dict(d, tmp_path / "ckpt", metadata={"note": "kept"}, shard_size=shard_size)
    back = load_state_dict(out)
    assert list(back) == list(d)
    for k in d:
        assert back[k].dtype == d[k].dtype and torch.equal(back[k], d[k]), k
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shard_size == 300:
        assert (
            files[0].startswith("model-00001-of-")
            and (out / "model.safetensors.index.json").is_file()
        )
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(d)
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for v in d.values()
        )
    else:
        assert files == ["model.safetensors"]
    # The reference reader agrees byte for byte, and our metadata is kept.
    for f in out.glob("*.safetensors"):
        ref = load_file(f)
        for k, v in ref.items():
            assert torch.equal(v, d[k])
        with safe_open(f, "pt") as h:
            assert h.metadata()["note"] == "kept"


def test_reads_files_written_by_the_reference_writer(tmp_path: Path) -> None:
    d = sample()
    save_file(d, tmp_path / "ref.safetensors", metadata={"a": "b"})
    src = open_checkpoint(tmp_path / "ref.safetensors")
    assert src.metadata == {"a": "b"}  # type: ignore[attr-defined]
    for k in d:
        assert torch.equal(src.read(k), d[k])
    flat = d["t.float32"].reshape(-1)
    assert torch.equal(src.read_range("t.float32", 3, 11), flat[3:11])
    buf = torch.empty(8, dtype=torch.float32)
    assert src.read_range("t.float32", 3, 11, out=buf).data_ptr() == buf.data_ptr()


def test_single_file_output(tmp_path: Path) -> None:
    d = sample()
    out = save_state_dict(d, tmp_path / "one.safetensors", shard_size=10)
    assert out.is_file() and not list(tmp_path.glob(".*tmp*"))
    assert all(torch.equal(load_file(out)[k], d[k]) for k in d)


def test_any_safetensors_layout_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    save_file({"a": torch.ones(2)}, tmp_path / "m" / "part-a.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "m" / "part-b.safetensors")
    assert sorted(load_state_dict(tmp_path / "m")) == ["a", "b"]


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"a": torch.ones(100)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-40])
    with pytest.raises(
        FormatError,
        match=r"x.safetensors: the header describes 400 bytes of tensor data but the file holds 360",
    ):
        open_checkpoint(tmp_path / "x.safetensors")


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    (tmp_path / "y.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"junk")
    with pytest.raises(FormatError, match="not a safetensors file"):
        open_checkpoint(tmp_path / "y.safetensors")


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1024") == 1024
    with pytest.raises(PlanError, match="cannot read size `five`"):
        parse_size("five")


def test_read_range_at_unaligned_offsets(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    data = {
        # An odd-sized first tensor puts the others at offsets that are not aligned.
        "odd": torch.randn(3, generator=g).to(torch.float16),
        "bf16": torch.randn(5000, generator=g).to(torch.bfloat16),
        "f32": torch.randn(40, 100, generator=g),
    }
    save_file(data, tmp_path / "x.safetensors")
    src = open_checkpoint(tmp_path / "x.safetensors")
    for name, t in data.items():
        flat = t.reshape(-1)
        for start, stop in [
            (0, flat.numel()),
            (1, 2),
            (2047, 4001),
            (flat.numel() - 1, flat.numel()),
        ]:
            if stop > flat.numel():
                continue
            got = src.read_range(name, start, stop)
            assert got.dtype == t.dtype and torch.equal(got, flat[start:stop])
        # Inputs are never mapped (a truncated mapping is a SIGBUS): the engine reads instead.
        assert not hasattr(src, "map_range")


def test_read_of_a_file_truncated_after_opening_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"a": torch.ones(10000)}, tmp_path / "x.safetensors")
    src = open_checkpoint(tmp_path / "x.safetensors")
    with open(tmp_path / "x.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(
        FormatError,
        match=r"x.safetensors: the file ended while reading `a`; it was truncated or replaced "
        "after merge opened it",
    ):
        src.read_range("a", 0, 10000)


def test_non_finite_input_tensor_warns_once_naming_it(tmp_path: Path) -> None:
    from merge.errors import MergeWarning

    w = torch.ones(1000)
    w[7], w[500] = float("nan"), float("inf")
    save_file({"ok": torch.ones(4), "w": w}, tmp_path / "x.safetensors")
    src = open_checkpoint(tmp_path / "x.safetensors")
    with pytest.warns(MergeWarning) as record:
        src.read("ok")
        src.read_range("w", 0, 100)
        src.read_range("w", 400, 600)  # the same tensor again: no second warning
    assert [str(r.message) for r in record] == [
        f"{tmp_path / 'x.safetensors'}: tensor `w` holds 1 NaN or Inf values in the range read; "
        "the merged tensor will be non-finite where it uses them"
    ]
    # Large finite values whose float32 sum overflows are not reported.
    big = torch.full((10,), 3e38)
    save_file({"big": big}, tmp_path / "big.safetensors")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        assert torch.equal(open_checkpoint(tmp_path / "big.safetensors").read("big"), big)
