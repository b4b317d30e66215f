"""Header validation: what the reference safetensors reader refuses, we refuse, naming file and key."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge.errors import FormatError
from merge.io import open_checkpoint
from merge.io.safetensors import MAX_HEADER


def write_raw(path: Path, header: object, data: bytes = b"", raw: bytes | None = None) -> Path:
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def two_tensors(**change: object) -> dict[str, object]:
    """a: F32[2] at [0, 8], b: F32[3] at [8, 20], with one entry's fields replaced."""
    h: dict[str, object] = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]},
    }
    for k, v in change.items():
        h[k] = v
    return h


def reference_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:
        return True
    return False


OFFSET_CASES = {
    "negative": (
        two_tensors(b={"dtype": "F32", "shape": [3], "data_offsets": [-4, 8]}),
        r"tensor `b`: `data_offsets` must be two non-negative integers \[begin, end\], not \[-4, 8\]",
    ),
    "overlapping": (
        two_tensors(b={"dtype": "F32", "shape": [3], "data_offsets": [4, 16]}),
        r"tensor `b` has data_offsets \[4, 16\] and overlaps the previous tensor \(expected it "
        r"to start at 8\)",
    ),
    "gap": (
        two_tensors(b={"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}),
        r"tensor `b` has data_offsets \[12, 20\] and leaves a gap of 4 bytes",
    ),
    "shifted from 0": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
        },
        r"tensor `a` has data_offsets \[4, 12\] and leaves a gap of 4 bytes",
    ),
    "wrong byte count": (
        two_tensors(b={"dtype": "F16", "shape": [3], "data_offsets": [8, 20]}),
        r"tensor `b`: data_offsets \[8, 20\] hold 12 bytes but shape \[3\] F16 needs 6",
    ),
    "end before begin": (
        two_tensors(b={"dtype": "F32", "shape": [0], "data_offsets": [20, 8]}),
        r"tensor `b`: data_offsets \[20, 8\] hold -12 bytes",
    ),
    "short of the file": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
        r"the header describes 8 bytes of tensor data but the file holds 20",
    ),
    "past the file": (
        two_tensors(
            b={"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        ),
        r"the header describes 24 bytes of tensor data but the file holds 20",
    ),
}


@pytest.mark.parametrize("case", list(OFFSET_CASES))
def test_bad_offsets_are_refused_like_the_reference_reader(tmp_path: Path, case: str) -> None:
    header, message = OFFSET_CASES[case]
    f = write_raw(tmp_path / "x.safetensors", header, bytes(20))
    assert reference_refuses(f)
    with pytest.raises(FormatError, match="x.safetensors: " + message):
        open_checkpoint(f)


def test_offsets_into_the_header_are_refused(tmp_path: Path) -> None:
    # Data offsets are relative to the end of the header: reaching back into it needs a
    # negative begin, and a file whose data is the header's own bytes does not tile.
    f = write_raw(
        tmp_path / "x.safetensors",
        {"a": {"dtype": "U8", "shape": [40], "data_offsets": [-40, 0]}},
        b"",
    )
    assert reference_refuses(f)
    with pytest.raises(FormatError, match="`data_offsets` must be two non-negative integers"):
        open_checkpoint(f)


def test_valid_files_from_the_reference_writer_still_open(tmp_path: Path) -> None:
    d = {"z": torch.zeros(0, 3), "a": torch.arange(6.0).view(2, 3), "s": torch.tensor(1.5)}
    save_file(d, tmp_path / "x.safetensors", metadata={"k": "v"})
    src = open_checkpoint(tmp_path / "x.safetensors")
    for k, v in d.items():
        assert torch.equal(src.read(k), v)


def test_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 5000) + b"{}")
    with pytest.raises(
        FormatError, match=r"header length 5000 runs past the end of the file \(10 bytes\)"
    ):
        open_checkpoint(f)


MALFORMED = {
    "header a list": (b"[1, 2]", r"malformed safetensors header: the header is not a JSON object"),
    "entry not an object": (
        json.dumps({"a": [1, 2]}).encode(),
        r"tensor `a`: its header entry is list, not an object",
    ),
    "missing shape": (
        json.dumps({"a": {"dtype": "F32", "data_offsets": [0, 0]}}).encode(),
        r"tensor `a`: its header entry has no `shape`",
    ),
    "shape of strings": (
        json.dumps({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}).encode(),
        r'tensor `a`: `shape` must be a list of non-negative integers, not \["2"\]',
    ),
    "shape of floats": (
        json.dumps({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}).encode(),
        r"`shape` must be a list of non-negative integers, not \[2.0\]",
    ),
    "shape of bools": (
        json.dumps({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}).encode(),
        r"`shape` must be a list of non-negative integers, not \[true\]",
    ),
    "dtype a number": (
        json.dumps({"a": {"dtype": 7, "shape": [], "data_offsets": [0, 4]}}).encode(),
        r"tensor `a`: `dtype` must be a string, not int",
    ),
    "offsets three": (
        json.dumps({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4, 8]}}).encode(),
        r"`data_offsets` must be two non-negative integers \[begin, end\], not \[0, 4, 8\]",
    ),
    "1000-deep JSON": (
        b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        r"the safetensors header nests too deeply",
    ),
    "lone surrogate key": (
        b'{"a\\ud800": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}',
        r"a tensor name `a\\ud800` is not valid Unicode \(a lone surrogate\)",
    ),
    "metadata not str to str": (
        json.dumps({"__metadata__": {"k": 1}}).encode(),
        r"`__metadata__` must map strings to strings",
    ),
    "metadata a list": (
        json.dumps({"__metadata__": ["k"]}).encode(),
        r"`__metadata__` must map strings to strings",
    ),
    "NaN literal": (
        b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
        r"`NaN` is not a valid JSON number",
    ),
    "not UTF-8": (b'{"\xff": 1}', r"the safetensors header is not UTF-8"),
    "not JSON": (b"{nope", r"the safetensors header is not valid JSON"),
    "huge dimension": (
        json.dumps({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode(),
        r"`shape` must be a list of non-negative integers",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_headers_name_the_file_and_key(tmp_path: Path, case: str) -> None:
    raw, message = MALFORMED[case]
    f = write_raw(tmp_path / "x.safetensors", None, b"\0" * 8, raw=raw)
    with pytest.raises(FormatError, match="x.safetensors: .*" + message):
        open_checkpoint(f)


def test_a_header_over_the_limit_is_refused_at_once(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    n = MAX_HEADER + 8
    with open(f, "wb") as h:
        h.write(struct.pack("<Q", n))
        h.truncate(8 + n)  # sparse: no need to write the bytes
    t = time.perf_counter()
    with pytest.raises(
        FormatError, match=rf"header length {n} bytes\); merge reads headers up to 25 MiB"
    ):
        open_checkpoint(f)
    assert time.perf_counter() - t < 0.5


def _header_of(n: int) -> bytes:
    entries = {
        f"model.layers.{i}.weight": {
            "dtype": "F32",
            "shape": [1],
            "data_offsets": [4 * i, 4 * i + 4],
        }
        for i in range(n)
    }
    return json.dumps(entries).encode()


def test_opening_costs_a_small_multiple_of_parsing_the_json(tmp_path: Path) -> None:
    # Validation, the quantization scan and the tensor table are linear passes over what
    # json.loads built, so opening costs a small multiple of the parse itself (the parse's
    # own time per byte grows a little with size: memory, not our code). With headers capped
    # at MAX_HEADER, no input can make opening take more than a few seconds.
    n = 40_000
    raw = _header_of(n)
    f = write_raw(tmp_path / "h.safetensors", None, bytes(4 * n), raw=raw)

    def best(fn) -> float:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    parse = best(lambda: json.loads(raw))
    opening = best(lambda: open_checkpoint(f))
    assert opening < 8 * parse + 0.5, (opening, parse)


def test_shard_index_pointing_outside_its_folder_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "outside.safetensors")
    (tmp_path / "m").mkdir()
    save_file({"b": torch.ones(2)}, tmp_path / "m" / "in.safetensors")
    for target in ["../outside.safetensors", str(tmp_path / "outside.safetensors")]:
        (tmp_path / "m" / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": target, "b": "in.safetensors"}})
        )
        with pytest.raises(
            FormatError,
            match=r"model.safetensors.index.json: `weight_map`.a points outside the model "
            r"folder \(.*outside.safetensors\); shard files must sit beside the index",
        ):
            open_checkpoint(tmp_path / "m")


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ('{"weight_map": {"a": 3}}', r"`weight_map`.a must be a file name, not 3"),
        ('{"weight_map": ["a"]}', r"`weight_map` must map tensor names to file names"),
        ('{"weight_map": {"a": ""}}', r"`weight_map`.a must be a file name"),
        ("[]", r"not a valid shard index \(no `weight_map`\)"),
        ('{"weight_map": {"a": "x\\u0000y"}}', r"`weight_map`.a must be a file name"),
    ],
)
def test_malformed_weight_map_values(tmp_path: Path, weight_map: str, message: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(weight_map)
    with pytest.raises(FormatError, match=r"model.safetensors.index.json: " + message):
        open_checkpoint(tmp_path)


def test_fifo_named_safetensors_in_a_folder_is_skipped(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    os.mkfifo(tmp_path / "zzz.safetensors")
    src = run_with_deadline(lambda: open_checkpoint(tmp_path), 10)
    assert src.keys() == ["a"]


def test_fifo_or_device_as_an_input_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.safetensors")
    for p in [tmp_path / "pipe.safetensors", Path("/dev/zero")]:
        with pytest.raises(FormatError, match=rf"{p}: not a regular file"):
            run_with_deadline(lambda p=p: open_checkpoint(p), 10)


def run_with_deadline(fn, seconds: float):  # type: ignore[no-untyped-def]
    """fn() in a thread; fail instead of hanging the suite when it blocks."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        # Unblock a reader stuck on a FIFO so the thread can end, then fail.
        pytest.fail(f"hung for more than {seconds} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]
