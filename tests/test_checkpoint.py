"""Tests of the torch-free NAMM trainer checkpoint reader/writer (namm_mlx.checkpoint).

Golden data: tests/fixtures/namm-reference (written by the original PyTorch code).
The torch-dependent tests at the end run only where torch is importable."""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from namm_mlx.checkpoint import writer as ckpt
from namm_mlx.checkpoint.reference import PARAM_SIZE
from namm_mlx.cma_es import cma_defaults
from namm_mlx.checkpoint import (
    CheckpointError,
    ReferenceCheckpoint,
    load_torch_pickle,
    read_reference_checkpoint,
    write_reference_checkpoint,
)

from conftest import REFERENCE as FIXTURES  # noqa: E402

SHAPES = ("tiny", "llama3_8b")
_REQUIRED = [f"checkpoint_{s}.pt" for s in SHAPES] + [f"expected_conversion_{s}.safetensors" for s in SHAPES]
_MISSING = [name for name in _REQUIRED if not (FIXTURES / name).is_file()]
if _MISSING:  # fail the whole module loudly: these tests must never be skipped silently
    raise RuntimeError(f"NAMM reference fixtures missing from {FIXTURES}: {', '.join(_MISSING)}")

P = 4172
POP = 32
BUFFERS = (
    "token_embedding_0_online_new_output_mean",
    "token_embedding_0_online_new_output_num",
    "token_embedding_0_online_new_output_var",
    "token_embedding_0_output_mean",
    "token_embedding_0_output_num",
    "token_embedding_0_output_var",
)
# Key order of the reference CMA_ES state dict (fixture README, "Checkpoint files").
STATE_KEYS = [
    "mu_eff",
    "weights",
    "weights_truncated",
    "g",
    "best_member",
    "best_fitness",
    "evo_path_c",
    "evo_path_sigma",
    "mean",
    "sigma",
    "C",
    "sample_C",
    "sample_B",
    "sample_D",
    "x",
    "y",
    *[f"stored_buffers_to_save.{b}" for b in BUFFERS],
    *[f"best_stored_buffers_to_save.{b}" for b in BUFFERS],
]
STATE_SHAPES = {
    "mu_eff": (),
    "weights": (POP,),
    "weights_truncated": (POP,),
    "g": (),
    "best_member": (P,),
    "best_fitness": (),
    "evo_path_c": (P,),
    "evo_path_sigma": (P,),
    "mean": (P,),
    "sigma": (),
    "C": (P, P),
    "sample_C": (P, P),
    "sample_B": (P, P),
    "sample_D": (P,),
    "x": (POP, P),
    "y": (POP, P),
}


def expected_conversion(shape: str) -> dict[str, np.ndarray]:
    """The converter's golden output as numpy (read with mlx, a runtime dependency)."""
    import mlx.core as mx

    loaded = mx.load(str(FIXTURES / f"expected_conversion_{shape}.safetensors"))
    return {key: np.array(value) for key, value in loaded.items()}


@pytest.fixture(scope="module", params=SHAPES)
def fixture_ckpt(request) -> tuple[str, ReferenceCheckpoint]:
    """Each fixture read once (it materialises four 66 MB placeholder tensors)."""
    return request.param, read_reference_checkpoint(FIXTURES / f"checkpoint_{request.param}.pt")


# ----------------------------------------------------------------------------------------
# helpers to craft files
# ----------------------------------------------------------------------------------------


def zip_checkpoint(path: Path, pickled: bytes, top: str = "ckpt", extra: dict[str, bytes] | None = None) -> Path:
    """A torch-style zip whose data.pkl is ``pickled``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{top}/data.pkl", pickled)
        archive.writestr(f"{top}/byteorder", b"little")
        for name, data in (extra or {}).items():
            archive.writestr(f"{top}/{name}", data)
        archive.writestr(f"{top}/version", b"3\n")
    return path


def rewrite_zip(src: Path, dst: Path, drop: tuple[str, ...] = (), replace: dict[str, bytes] | None = None) -> Path:
    """Copy a zip, dropping entries whose name ends with one of ``drop`` and replacing others."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith(drop):
                continue
            suffix = next((k for k in replace if info.filename.endswith(k)), None)
            zout.writestr(info.filename, replace[suffix] if suffix else zin.read(info.filename))
    return dst


def str_op(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def call_pickle(module: str, name: str, args: bytes) -> bytes:
    """Opcodes (no PROTO/STOP) that call ``module.name(*args)``; ``args`` pushes one tuple."""
    return f"c{module}\n{name}\n".encode() + args + b"R"


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickle fragments that would create ``marker`` if executed."""
    touch = f"touch {marker}"
    return {
        "os.system": call_pickle("os", "system", str_op(touch) + b"\x85"),
        "posix.system": call_pickle("posix", "system", str_op(touch) + b"\x85"),
        "builtins.eval": call_pickle("builtins", "eval", str_op(f"open({str(marker)!r}, 'w').close()") + b"\x85"),
        "subprocess.Popen": call_pickle(
            "subprocess", "Popen", b"](" + str_op("touch") + str_op(str(marker)) + b"e\x85"
        ),
        "builtins.exec": call_pickle("builtins", "exec", str_op(f"open({str(marker)!r}, 'w').close()") + b"\x85"),
    }


def whole_pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def nested_pickle(body: bytes) -> bytes:
    """The payload as the value of 'evolution_state' in an otherwise plausible checkpoint."""
    return b"\x80\x02}" + str_op("iter_num") + b"K\x05" + str_op("evolution_state") + body + b"\x87" + b"."


def tiny_values() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = expected_conversion("tiny")
    return data["param_vector"], data["norm.mean"], data["norm.var"], data["norm.count"]


def assert_one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# ----------------------------------------------------------------------------------------
# 1. reading the reference fixtures
# ----------------------------------------------------------------------------------------


def test_fixture_matches_expected_conversion(fixture_ckpt):
    shape, ck = fixture_ckpt
    expected = expected_conversion(shape)
    assert ck.mean.dtype == np.float32 and ck.mean.shape == (P,)
    np.testing.assert_array_equal(ck.mean, expected["param_vector"])
    np.testing.assert_array_equal(ck.norm_mean, expected["norm.mean"])
    np.testing.assert_array_equal(ck.norm_var, expected["norm.var"])
    np.testing.assert_array_equal(ck.norm_count, expected["norm.count"])
    assert ck.norm_count.dtype == np.int64
    assert ck.norm_count[0] == {"tiny": 3328, "llama3_8b": 137448}[shape]
    np.testing.assert_array_equal(ck.best_member, expected["param_vector"])
    np.testing.assert_array_equal(ck.best_norm_mean, expected["norm.mean"])
    np.testing.assert_array_equal(ck.best_norm_var, expected["norm.var"])
    np.testing.assert_array_equal(ck.best_norm_count, expected["norm.count"])
    assert ck.iter_num == 360 and type(ck.iter_num) is int
    assert ck.best_val_loss == 0.5 and type(ck.best_val_loss) is float
    np.testing.assert_allclose(ck.mean[:5], [-0.5629199, -0.5761801, -0.1252893, -0.2169394, 0.4243552], rtol=1e-6)


def test_fixture_evolution_state_honours_strides(fixture_ckpt):
    _, ck = fixture_ckpt
    state = ck.evolution_state
    assert list(state) == STATE_KEYS
    for key, shape in STATE_SHAPES.items():
        assert state[key].shape == shape and state[key].dtype == np.float32, key
    for key in STATE_KEYS[16:]:
        assert state[key].shape == (1, 1, 1, 17)
        assert state[key].dtype == (np.int64 if key.endswith("_num") else np.float32)
    # stride (0, 1) over a P-element storage: every row is the vector
    assert (state["x"] == ck.mean[None, :]).all()
    # stride (0, 0) placeholders over a 1-element storage
    for key in ("C", "sample_C", "sample_B", "y"):
        assert not state[key].any(), key
    assert state["C"].flags.writeable and state["C"].flags.c_contiguous
    assert float(state["g"]) == 360.0 and float(state["best_fitness"]) == 0.5
    assert float(state["sigma"]) == pytest.approx(0.065)
    assert float(state["mu_eff"]) == pytest.approx(9.178830, abs=1e-6)
    assert state["sample_D"].min() == pytest.approx(0.9999956, abs=1e-7)
    assert state["sample_D"].max() == pytest.approx(1.0020862, abs=1e-7)


def test_member_selects_the_matching_buffers(fixture_ckpt):
    _, ck = fixture_ckpt
    vec, mean, var = ck.member("mean")
    assert vec is ck.mean and mean is ck.norm_mean and var is ck.norm_var
    vec, mean, var = ck.member("best")
    assert vec is ck.best_member and mean is ck.best_norm_mean and var is ck.best_norm_var
    with pytest.raises(CheckpointError, match="mean"):
        ck.member("worst")


def test_member_best_falls_back_to_stored_buffers():
    vec = np.arange(P, dtype=np.float32)
    stats = np.ones(17, np.float32)
    ck = ReferenceCheckpoint(vec, vec + 1, stats, stats * 2, None, None, None, None, None, None)
    best, mean, var = ck.member("best")
    np.testing.assert_array_equal(best, vec + 1)
    assert mean is ck.norm_mean and var is ck.norm_var
    ck.best_member = None
    with pytest.raises(CheckpointError, match="best_member"):
        ck.member("best")


def test_generic_loader_keeps_python_and_numpy_types():
    top = load_torch_pickle(FIXTURES / "checkpoint_tiny.pt")
    assert type(top) is dict and list(top) == ["evolution_state", "iter_num", "best_val_loss"]
    assert type(top["evolution_state"]) is collections.OrderedDict
    assert type(top["best_val_loss"]) is np.float64 and top["best_val_loss"] == 0.5
    assert type(top["iter_num"]) is int


# ----------------------------------------------------------------------------------------
# 2. malicious pickles are refused before they run
# ----------------------------------------------------------------------------------------

PAYLOAD_NAMES = ["os.system", "posix.system", "builtins.eval", "subprocess.Popen", "builtins.exec"]


def test_payloads_are_live_under_plain_pickle(tmp_path):
    """Control: the crafted payloads really execute with an unrestricted unpickler, so the
    'marker does not exist' assertions below are meaningful."""
    for name in ("os.system", "builtins.eval"):
        marker = tmp_path / f"pwned-{name}"
        pickle.loads(whole_pickle(payloads(marker)[name]))
        assert marker.exists(), name


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
@pytest.mark.parametrize("container", ["zip", "zip-nested", "raw-pickle", "legacy-header"])
def test_malicious_pickle_is_refused(tmp_path, name, container):
    marker = tmp_path / "pwned"
    body = payloads(marker)[name]
    path = tmp_path / "checkpoint.pt"
    if container == "zip":
        zip_checkpoint(path, whole_pickle(body))
    elif container == "zip-nested":
        zip_checkpoint(path, nested_pickle(body))
    elif container == "raw-pickle":
        path.write_bytes(whole_pickle(body))
    else:  # valid legacy magic/protocol/sys_info, then the payload as the main pickle
        head = (
            pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2) + pickle.dumps({"little_endian": True}, 2)
        )
        path.write_bytes(head + whole_pickle(body))
    with pytest.raises(CheckpointError) as excinfo:
        read_reference_checkpoint(path)
    message = assert_one_line_error(excinfo)
    assert "refused" in message and name in message and "checkpoint.pt" in message
    assert not marker.exists()


def test_refusal_happens_before_earlier_allowed_calls_matter(tmp_path):
    """A payload hidden after genuine tensors is still refused (the whole load aborts)."""
    marker = tmp_path / "pwned"
    genuine = ckpt._PickleEmitter().dumps({"a": np.zeros(3, np.float32)})[:-1]  # drop STOP
    body = genuine[2:] + str_op("b") + payloads(marker)["os.system"] + b"s"
    path = zip_checkpoint(tmp_path / "c.pt", b"\x80\x02" + body + b".", extra={"data/0": bytes(12)})
    with pytest.raises(CheckpointError, match="refused"):
        load_torch_pickle(path)
    assert not marker.exists()


def test_stand_ins_cannot_be_modified_by_build(tmp_path):
    """BUILD on an allow-listed global would otherwise let a pickle re-point it."""
    body = b"ctorch._utils\n_rebuild_tensor_v2\n}" + str_op("fn") + b"K\x01sb"
    with pytest.raises(CheckpointError, match="refused.*modify"):
        load_torch_pickle(zip_checkpoint(tmp_path / "c.pt", whole_pickle(body)))
    body = b"ctorch\nFloatStorage\n}" + str_op("dtype") + str_op("O") + b"sb"
    with pytest.raises(CheckpointError, match="refused.*modify"):
        load_torch_pickle(zip_checkpoint(tmp_path / "d.pt", whole_pickle(body)))


def test_object_numpy_dtype_is_refused(tmp_path):
    body = b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n" + str_op("O") + b"\x89\x88\x87R" + b"C\x00\x86R"
    with pytest.raises(CheckpointError, match="refused"):
        load_torch_pickle(zip_checkpoint(tmp_path / "c.pt", whole_pickle(body)))


def _tensor_pickle(numel: int, shape: tuple, stride: tuple, offset: int = 0) -> bytes:
    pid = ckpt._Persistent(("storage", ckpt._Global("torch", "FloatStorage"), "0", "cpu", numel))
    record = ckpt._Reduce(
        ckpt._Global("torch._utils", "_rebuild_tensor_v2"),
        (pid, offset, shape, stride, False, collections.OrderedDict()),
    )
    return ckpt._PickleEmitter().dumps({"t": record})


@pytest.mark.parametrize(
    ("shape", "stride", "offset", "match"),
    [
        ((10,), (1,), 0, "reads element"),  # view past the end of a 4-element storage
        ((2, 2), (3, 1), 0, "reads element"),
        ((4,), (1,), 1, "reads element"),
        ((1 << 15, 1 << 15), (0, 0), 0, "expand"),  # 1 G elements from one float
    ],
)
def test_out_of_bounds_or_huge_views_are_refused(tmp_path, shape, stride, offset, match):
    path = zip_checkpoint(tmp_path / "c.pt", _tensor_pickle(4, shape, stride, offset), extra={"data/0": bytes(16)})
    with pytest.raises(CheckpointError, match=match) as excinfo:
        load_torch_pickle(path)
    assert_one_line_error(excinfo)


# ----------------------------------------------------------------------------------------
# 3. damaged files
# ----------------------------------------------------------------------------------------


def _damaged(tmp_path: Path, kind: str) -> Path:
    source = FIXTURES / "checkpoint_tiny.pt"
    path = tmp_path / "ckpt.pt"
    raw = source.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "random-pickle-start":
        path.write_bytes(b"\x80\x02" + np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        pass
    elif kind == "directory":
        path.mkdir()
    elif kind == "no-data-pkl":
        rewrite_zip(source, path, drop=("data.pkl",))
    elif kind == "storage-missing":
        rewrite_zip(source, path, drop=("/data/8",))
    elif kind == "storage-short":
        rewrite_zip(source, path, replace={"/data/8": bytes(100)})
    elif kind == "pickle-truncated":
        with zipfile.ZipFile(source) as archive:
            pickled = archive.read("checkpoint_tiny/data.pkl")
        rewrite_zip(source, path, replace={"data.pkl": pickled[: len(pickled) // 2]})
    elif kind == "bad-crc":  # flip one payload byte of data/8 without fixing its CRC
        with zipfile.ZipFile(source) as archive:
            offset = archive.getinfo("checkpoint_tiny/data/8").header_offset
        name_len, extra_len = struct.unpack("<HH", raw[offset + 26 : offset + 30])
        data = bytearray(raw)
        data[offset + 30 + name_len + extra_len + 10] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "bad-byteorder":
        rewrite_zip(source, path, replace={"byteorder": b"middle"})
    elif kind == "legacy-bad-magic":
        path.write_bytes(pickle.dumps(12345, 2) + pickle.dumps(1001, 2))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "random",
        "random-pickle-start",
        "empty",
        "missing",
        "directory",
        "no-data-pkl",
        "storage-missing",
        "storage-short",
        "pickle-truncated",
        "bad-crc",
        "bad-byteorder",
        "legacy-bad-magic",
    ],
)
def test_damaged_files_raise_one_line_errors(tmp_path, kind):
    path = _damaged(tmp_path, kind)
    with pytest.raises(CheckpointError) as excinfo:
        read_reference_checkpoint(path)
    message = assert_one_line_error(excinfo)
    assert "ckpt.pt" in message


def test_damage_messages_say_what_is_wrong(tmp_path):
    cases = {
        "truncated": "damaged zip",
        "empty": "empty",
        "missing": "not found",
        "no-data-pkl": "without data.pkl",
        "storage-missing": "data/8 is missing",
        "storage-short": "holds 100 bytes",
        "pickle-truncated": "truncated or corrupt",
        "bad-crc": "CRC",
    }
    for kind, text in cases.items():
        sub = tmp_path / kind
        sub.mkdir()
        with pytest.raises(CheckpointError, match=text):
            read_reference_checkpoint(_damaged(sub, kind))


# ----------------------------------------------------------------------------------------
# semantic validation of the NAMM checkpoint
# ----------------------------------------------------------------------------------------


def _state(mean_size: int = P, drop: tuple[str, ...] = ()) -> collections.OrderedDict:
    state = collections.OrderedDict()
    state["mean"] = np.zeros(mean_size, np.float32)
    for name in BUFFERS:
        dtype = np.int64 if name.endswith("_num") else np.float32
        state[f"stored_buffers_to_save.{name}"] = np.ones((1, 1, 1, 17), dtype)
    for key in drop:
        del state[key]
    return state


@pytest.mark.parametrize(
    ("top", "match"),
    [
        ({"iter_num": 1}, "no 'evolution_state'"),
        ([1, 2, 3], "no 'evolution_state'"),
        ({"evolution_state": 5}, "not a state dict"),
        ({"evolution_state": _state(drop=("mean",))}, r"no evolution_state\['mean'\]"),
        ({"evolution_state": _state(mean_size=100)}, r"has 100 parameters, expected 4,172 \(qkv 25x96\+96"),
        ({"evolution_state": _state(mean_size=4173)}, "4,173 parameters, expected 4,172"),
        (
            {"evolution_state": _state(drop=("stored_buffers_to_save.token_embedding_0_output_var",))},
            "no normalisation statistics",
        ),
        (
            {"evolution_state": _state(drop=("stored_buffers_to_save.token_embedding_0_output_mean",))},
            "no normalisation statistics",
        ),
    ],
)
def test_not_a_namm_checkpoint(tmp_path, top, match):
    path = tmp_path / "ckpt.pt"
    ckpt._save_torch_zip(path, top)
    with pytest.raises(CheckpointError, match=match) as excinfo:
        read_reference_checkpoint(path)
    assert_one_line_error(excinfo)


def test_minimal_state_reads_with_optional_parts_absent(tmp_path):
    path = tmp_path / "ckpt.pt"
    ckpt._save_torch_zip(path, {"evolution_state": _state()})
    ck = read_reference_checkpoint(path)
    assert ck.best_member is None and ck.best_norm_mean is None and ck.iter_num is None
    assert ck.best_val_loss is None and ck.norm_count.tolist() == [1] * 17


# ----------------------------------------------------------------------------------------
# the generic loader: strides, dtypes, byte order, legacy format
# ----------------------------------------------------------------------------------------


def test_emitted_values_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i64": np.arange(-3, 4, dtype=np.int64),
        "i32": np.arange(4, dtype=np.int32),
        "i16": np.arange(4, dtype=np.int16),
        "i8": np.arange(-2, 2, dtype=np.int8),
        "u8": np.arange(4, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    storage = ckpt._dense_storage(np.arange(12, dtype=np.float32))
    views = {
        "transposed": ckpt._OutTensor(storage, (4, 3), (1, 4)),
        "offset_slice": ckpt._OutTensor(storage, (2, 2), (4, 2), offset=5),
        "broadcast": ckpt._OutTensor(storage, (3, 2), (0, 1), offset=10),
    }
    plain = {
        "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31, 2**70, -(2**70)],
        "floats": (0.1, -1e300, float("inf")),
        "misc": collections.OrderedDict(none=None, yes=True, no=False, text="naïve ✓"),
        "tuples": ((), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)),
    }
    ckpt._save_torch_zip(tmp_path / "x.pt", {**arrays, **views, **plain})
    loaded = load_torch_pickle(tmp_path / "x.pt")
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value)
    base = np.arange(12, dtype=np.float32)
    np.testing.assert_array_equal(loaded["transposed"], base.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["offset_slice"], [[5, 7], [9, 11]])
    np.testing.assert_array_equal(loaded["broadcast"], [[10, 11]] * 3)
    for key, value in plain.items():
        assert loaded[key] == value and type(loaded[key]) is type(value), key


def test_big_endian_byteorder_record_is_honoured(tmp_path):
    values = np.array([1.5, -2.25, 3e-5], np.float32)
    counts = np.array([1, 2**40], np.int64)
    ckpt._save_torch_zip(tmp_path / "le.pt", {"v": values, "c": counts})
    big = {"byteorder": b"big", "/data/0": values.astype(">f4").tobytes(), "/data/1": counts.astype(">i8").tobytes()}
    rewrite_zip(tmp_path / "le.pt", tmp_path / "be.pt", replace=big)
    loaded = load_torch_pickle(tmp_path / "be.pt")
    np.testing.assert_array_equal(loaded["v"], values)
    np.testing.assert_array_equal(loaded["c"], counts)
    assert loaded["v"].dtype.isnative


def test_bfloat16_storage_becomes_float32(tmp_path):
    bits = np.array([0x3FC0, 0xC010, 0x0000], np.uint16)  # 1.5, -2.25, 0.0
    pid = ckpt._Persistent(("storage", ckpt._Global("torch", "BFloat16Storage"), "0", "cpu", 3))
    record = ckpt._Reduce(
        ckpt._Global("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (3,), (1,), False, collections.OrderedDict())
    )
    path = zip_checkpoint(
        tmp_path / "c.pt", ckpt._PickleEmitter().dumps({"t": record}), extra={"data/0": bits.tobytes()}
    )
    loaded = load_torch_pickle(path)["t"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, [1.5, -2.25, 0.0])


def _legacy_file(path: Path, values: np.ndarray, counts: np.ndarray) -> Path:
    """A pre-1.6 torch file built by hand: magic, protocol, sys_info, main pickle (with a
    storage view), storage keys, then ``<int64 numel><raw>`` per storage."""

    def tensor(kind: str, key: str, numel: int, shape, stride, view=None):
        pid = ckpt._Persistent(("storage", ckpt._Global("torch", kind), key, "cpu", numel, view))
        return ckpt._Reduce(
            ckpt._Global("torch._utils", "_rebuild_tensor_v2"),
            (pid, 0, shape, stride, False, collections.OrderedDict()),
        )

    main = {
        "values": tensor("FloatStorage", "100", values.size, values.shape, (values.shape[1], 1)),
        "tail": tensor("FloatStorage", "100", values.size, (2,), (1,), view=("101", values.size - 2, 2)),
        "counts": tensor("LongStorage", "7", counts.size, counts.shape, (1,)),
        "step": 3,
    }
    blob = io.BytesIO()
    blob.write(pickle.dumps(0x1950A86A20F9469CFC6C, 2))
    blob.write(pickle.dumps(1001, 2))
    blob.write(pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}, 2))
    blob.write(ckpt._PickleEmitter().dumps(main))
    blob.write(pickle.dumps(["100", "7"], 2))
    for array in (values.astype("<f4"), counts.astype("<i8")):
        blob.write(struct.pack("<q", array.size) + array.tobytes())
    path.write_bytes(blob.getvalue())
    return path


def test_legacy_format_is_read(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    counts = np.array([5, 6, 7], np.int64)
    loaded = load_torch_pickle(_legacy_file(tmp_path / "old.pt", values, counts))
    np.testing.assert_array_equal(loaded["values"], values)
    np.testing.assert_array_equal(loaded["tail"], values.reshape(-1)[-2:])
    np.testing.assert_array_equal(loaded["counts"], counts)
    assert loaded["step"] == 3


def test_truncated_legacy_file_is_an_error(tmp_path):
    path = _legacy_file(tmp_path / "old.pt", np.ones((2, 3), np.float32), np.ones(3, np.int64))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="truncated") as excinfo:
        load_torch_pickle(path)
    assert_one_line_error(excinfo)


# ----------------------------------------------------------------------------------------
# 4. the writer
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_writer_round_trip(tmp_path, shape):
    ref = read_reference_checkpoint(FIXTURES / f"checkpoint_{shape}.pt")
    path = tmp_path / "ckpt.pt"
    write_reference_checkpoint(
        path, ref.mean, ref.norm_mean, ref.norm_var, ref.norm_count, iter_num=360, best_val_loss=0.5
    )
    back = read_reference_checkpoint(path)
    for name in (
        "mean",
        "best_member",
        "norm_mean",
        "norm_var",
        "norm_count",
        "best_norm_mean",
        "best_norm_var",
        "best_norm_count",
    ):
        got, want = getattr(back, name), getattr(ref, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert back.iter_num == 360 and back.best_val_loss == 0.5 and type(back.best_val_loss) is float
    # same keys, order, shapes and dtypes as the reference state dict (what load_state_dict needs)
    assert list(back.evolution_state) == list(ref.evolution_state) == STATE_KEYS
    for key, want in ref.evolution_state.items():
        got = back.evolution_state[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
    state = back.evolution_state
    for key in ("mu_eff", "weights", "weights_truncated"):  # genuine CMA-ES constants
        np.testing.assert_allclose(state[key], ref.evolution_state[key], rtol=2e-7, atol=3e-8, err_msg=key)
    for key in ("g", "best_fitness", "sigma", "evo_path_c", "evo_path_sigma", "C", "sample_C", "sample_B", "y"):
        np.testing.assert_array_equal(state[key], ref.evolution_state[key], err_msg=key)
    assert (state["x"] == ref.mean).all() and (state["sample_D"] == 1).all()


def test_writer_defaults_and_none_loss(tmp_path):
    vec, mean, var, _ = tiny_values()
    path = tmp_path / "latest.pt"
    write_reference_checkpoint(path, vec, mean, var, pop_size=16)
    back = read_reference_checkpoint(path)
    assert back.iter_num == 0 and back.best_val_loss is None
    assert back.norm_count.tolist() == [0] * 17
    state = back.evolution_state
    assert state["x"].shape == (16, P) and state["weights"].shape == (16,)
    assert float(state["best_fitness"]) == -np.finfo(np.float32).max
    assert float(state["mu_eff"]) == pytest.approx(4.8409145, rel=1e-6)


def test_cma_defaults_match_the_spec_tables():
    """namm-spec.md §7.1, values for n = 4172."""
    for pop, mu_eff, minus, alpha, first, edges, total in [
        (
            32,
            9.1788288,
            12.6768503,
            1.1372621,
            (0.197672, 0.148796, 0.120206),
            (0.0021698, -0.0056281, -0.1248762),
            -0.1372621,
        ),
        (
            16,
            4.8409145,
            6.3507200,
            1.3282493,
            (0.328436, 0.222059, 0.159832),
            (0.0093041, -0.0257644, -0.2851121),
            -0.3282493,
        ),
    ]:
        d = cma_defaults(pop, PARAM_SIZE)
        mu = pop // 2
        assert d.mu_eff == pytest.approx(mu_eff, rel=1e-7)
        assert d.mu_eff_minus == pytest.approx(minus, rel=1e-7)
        assert d.alpha_min == pytest.approx(alpha, rel=1e-7)
        assert d.c_1 == pytest.approx(1.148e-07, rel=1e-3)
        np.testing.assert_allclose(d.weights[:3], first, atol=1e-6)
        np.testing.assert_allclose(d.weights[[mu - 1, mu, pop - 1]], edges, atol=1e-7)
        assert float(d.weights.astype(np.float64).sum()) == pytest.approx(total, abs=1e-6)
        np.testing.assert_array_equal(d.weights_truncated[:mu], d.weights[:mu])
        assert not d.weights_truncated[mu:].any()


def test_writer_dense_covariance_is_identity_in_one_storage(tmp_path):
    vec, mean, var, count = tiny_values()
    path = tmp_path / "ckpt.pt"
    write_reference_checkpoint(path, vec, mean, var, count, iter_num=7, dense_covariance=True)
    assert 66 * 2**20 < path.stat().st_size < 70 * 2**20  # C, sample_C, sample_B share one storage
    state = read_reference_checkpoint(path).evolution_state
    eye = np.eye(P, dtype=np.float32)
    for key in ("C", "sample_C", "sample_B"):
        np.testing.assert_array_equal(state[key], eye, err_msg=key)


def test_written_zip_layout(tmp_path):
    vec, mean, var, count = tiny_values()
    path = tmp_path / "ckpt.pt"
    write_reference_checkpoint(path, vec, mean, var, count, iter_num=360, best_val_loss=0.5)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        assert names[0] == "ckpt/data.pkl" and names[1] == "ckpt/byteorder" and names[-1] == "ckpt/version"
        assert names[2:-1] == [f"ckpt/data/{i}" for i in range(len(names) - 3)]
        assert archive.read("ckpt/version") == b"3\n" and archive.read("ckpt/byteorder") == b"little"
        pickled = archive.read("ckpt/data.pkl")
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    assert pickled[:2] == b"\x80\x02"
    globals_used = {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"}
    assert globals_used == {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
        "torch.LongStorage",
    }
    assert len(names) - 3 == 22  # storages: 16 tensors + 6 buffers shared with the best_ copies


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vector": np.zeros(4171)}, r"4,171 values, expected 4,172 \(qkv 25x96\+96"),
        ({"vector": np.zeros((2, P))}, "expected 4,172"),
        ({"vector": np.full(P, np.nan)}, "NaN"),
        ({"vector": ["a"] * P}, "numeric"),
        ({"norm_mean": np.zeros(16)}, "17 spectrogram bins"),
        ({"norm_var": -np.ones(17)}, "negative"),
        ({"norm_count": np.full(17, 0.5)}, "whole numbers"),
        ({"iter_num": -1}, "iter_num"),
        ({"pop_size": 1}, "pop_size"),
        ({"best_val_loss": float("nan")}, "best_val_loss"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, kwargs, match):
    vec, mean, var, _ = tiny_values()
    args = {"vector": vec, "norm_mean": mean, "norm_var": var, **kwargs}
    path = tmp_path / "ckpt.pt"
    with pytest.raises(CheckpointError, match=match) as excinfo:
        write_reference_checkpoint(path, **args)
    assert_one_line_error(excinfo)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_writer_is_atomic(tmp_path, monkeypatch):
    vec, mean, var, count = tiny_values()
    path = tmp_path / "ckpt.pt"
    write_reference_checkpoint(path, vec, mean, var, count, iter_num=1)
    before = path.read_bytes()
    real = ckpt._write_zip_entry
    calls = []

    def failing(archive, name, size, write):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real(archive, name, size, write)

    monkeypatch.setattr(ckpt, "_write_zip_entry", failing)
    with pytest.raises(CheckpointError, match="No space left") as excinfo:
        write_reference_checkpoint(path, vec * 2, mean, var, count, iter_num=2)
    assert_one_line_error(excinfo)
    assert len(calls) == 5
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind


def test_writer_reports_missing_directory(tmp_path):
    vec, mean, var, _ = tiny_values()
    with pytest.raises(CheckpointError, match="does not exist"):
        write_reference_checkpoint(tmp_path / "nope" / "ckpt.pt", vec, mean, var)


def test_writer_accepts_mlx_arrays(tmp_path):
    mx = pytest.importorskip("mlx.core")
    vec, mean, var, count = tiny_values()
    path = tmp_path / "ckpt.pt"
    write_reference_checkpoint(path, mx.array(vec), mx.array(mean), mx.array(var), mx.array(count))
    back = read_reference_checkpoint(path)
    np.testing.assert_array_equal(back.mean, vec)
    np.testing.assert_array_equal(back.norm_count, count)


# ----------------------------------------------------------------------------------------
# 5. interoperability with real torch (only where torch is installed)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_only", [False, True])
def test_torch_loads_written_checkpoint(tmp_path, weights_only):
    torch = pytest.importorskip("torch")
    vec, mean, var, count = tiny_values()
    path = tmp_path / "ckpt.pt"
    write_reference_checkpoint(path, vec, mean, var, count, iter_num=360, best_val_loss=0.5)
    top = torch.load(path, map_location="cpu", weights_only=weights_only)
    ref = torch.load(FIXTURES / "checkpoint_tiny.pt", map_location="cpu", weights_only=False)
    assert top["iter_num"] == 360 and top["best_val_loss"] == 0.5
    state = top["evolution_state"]
    assert isinstance(state, collections.OrderedDict) and list(state) == list(ref["evolution_state"])
    for key, want in ref["evolution_state"].items():
        got = state[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        torch.empty(want.shape, dtype=want.dtype).copy_(got)  # what load_state_dict does per entry
    np.testing.assert_array_equal(state["mean"].numpy(), vec)
    np.testing.assert_array_equal(state["best_member"].numpy(), vec)
    np.testing.assert_array_equal(state["x"].numpy(), np.broadcast_to(vec, (POP, P)))
    buf = "stored_buffers_to_save.token_embedding_0_output_"
    np.testing.assert_array_equal(state[buf + "mean"].numpy().reshape(-1), mean)
    np.testing.assert_array_equal(state[buf + "var"].numpy().reshape(-1), var)
    np.testing.assert_array_equal(state[buf + "num"].numpy().reshape(-1), count)
    for key in ("mu_eff", "weights", "weights_truncated", "sigma", "g", "best_fitness"):
        torch.testing.assert_close(state[key], ref["evolution_state"][key], rtol=2e-7, atol=3e-8)
    assert not state["C"].any()
    # 64-byte aligned storages: torch can memory-map the file
    mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    np.testing.assert_array_equal(mapped["evolution_state"]["mean"].numpy(), vec)


def test_torch_loads_dense_covariance(tmp_path):
    torch = pytest.importorskip("torch")
    vec, mean, var, count = tiny_values()
    path = tmp_path / "ckpt.pt"
    write_reference_checkpoint(path, vec, mean, var, count, dense_covariance=True)
    state = torch.load(path, map_location="cpu", weights_only=True)["evolution_state"]
    eye = torch.eye(P)
    for key in ("C", "sample_C", "sample_B"):
        assert torch.equal(state[key], eye), key


def test_reader_agrees_with_torch_on_fixture():
    torch = pytest.importorskip("torch")
    ref = torch.load(FIXTURES / "checkpoint_tiny.pt", map_location="cpu", weights_only=False)
    ours = load_torch_pickle(FIXTURES / "checkpoint_tiny.pt")
    assert list(ours["evolution_state"]) == list(ref["evolution_state"])
    for key, tensor in ref["evolution_state"].items():
        np.testing.assert_array_equal(ours["evolution_state"][key], tensor.numpy(), err_msg=key)
    assert ours["best_val_loss"] == ref["best_val_loss"] and ours["iter_num"] == ref["iter_num"]


@pytest.mark.parametrize("legacy", [False, True])
def test_reader_reads_torch_written_files(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    obj = {
        "f32": base,
        "t": base.t(),
        "slice": base[1:4, ::2],
        "f64": base.double(),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.arange(-3, 4),
        "i32": torch.arange(4, dtype=torch.int32),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "expanded": torch.arange(3.0).expand(4, 3),
        "shared": base[2],
        "od": collections.OrderedDict(a=1, b=[1, 2.5, "s", None, True]),
        "np64": np.float64(0.25),
        "npi": np.int64(7),
    }
    if not legacy:
        obj["u16"] = torch.arange(4).to(torch.uint16)  # rebuilt via _rebuild_tensor_v3
    path = tmp_path / "t.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    loaded = load_torch_pickle(path)
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            want = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
            assert loaded[key].dtype == want.dtype and loaded[key].shape == want.shape, key
            np.testing.assert_array_equal(loaded[key], want, err_msg=key)
        else:
            assert loaded[key] == value and type(loaded[key]) is type(value), key


def test_reader_reads_legacy_resave_of_fixture(tmp_path):
    torch = pytest.importorskip("torch")
    top = torch.load(FIXTURES / "checkpoint_llama3_8b.pt", map_location="cpu", weights_only=False)
    path = tmp_path / "iter_360.pt"
    torch.save(top, path, _use_new_zipfile_serialization=False)
    ck = read_reference_checkpoint(path)
    expected = expected_conversion("llama3_8b")
    np.testing.assert_array_equal(ck.mean, expected["param_vector"])
    np.testing.assert_array_equal(ck.norm_var, expected["norm.var"])
    assert ck.iter_num == 360 and ck.best_val_loss == 0.5
