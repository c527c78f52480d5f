"""The MLX NAMM replays the reference PyTorch trajectory, call by call.

Every intermediate recorded by the original code (STFT, EMA, normalisation,
recency, 25-d features, BAM attention output, gated features, scores), the
retained indices, the evicted caches and the carried state are compared for
all four calls of ``tiny_trajectory.npz``, with our own carried state fed
forward (a true replay, not a per-call reset to the golden state).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from namm_mlx import NAMM, NAMMConfig, TokenState
from namm_mlx.features import RecencyTable, gqa_mean, hann_window
from namm_mlx.selection import gather_tokens, select_kept

N_CALLS, N_LAYERS = 4, 2
FLOAT32 = NAMMConfig(attention_dtype="float32")  # the fixtures are float32 end to end


def assert_close(
    actual, expected, what: str, rtol: float = 1e-4, atol: float = 1e-5, scale_atol: float = 5e-6
) -> None:
    """Each element within ``rtol`` relative or ``atol`` absolute of the reference.

    The BAM tensors reach magnitudes of 100-260 while some elements are near 0:
    both float32 implementations then carry rounding noise proportional to the
    tensor's scale, not to the element (the reference itself is up to 4e-4 away
    from a float64 evaluation of its own inputs on ``bam_mlp_input``). So the
    absolute floor is also ``scale_atol`` times the tensor's largest magnitude,
    about forty float32 ulps of it (the reference's own distance to float64
    is up to 2.5e-6 of the scale on ``bam_attention_output``).
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    floor = max(atol, scale_atol * float(np.abs(expected).max(initial=0.0)))
    bad = err > np.maximum(floor, rtol * np.abs(expected))
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} values off; worst abs err {err.max():.3g} "
        f"at {np.unravel_index(err.argmax(), err.shape)}"
    )


@pytest.fixture(scope="module")
def trajectory(reference_dir):
    with np.load(reference_dir / "tiny_trajectory.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def expected_tiny(reference_conversion):
    return reference_conversion


@pytest.fixture(scope="module")
def namm(expected_tiny) -> NAMM:
    e = expected_tiny
    return NAMM.from_flat(e["param_vector"], e["norm.mean"], e["norm.var"], FLOAT32, e["norm.count"])


def replay(namm: NAMM, trajectory: dict):
    """Yield (call, layer, step result, our input caches, our output caches)."""
    carried: dict[int, TokenState | None] = {l: None for l in range(N_LAYERS)}
    kv: dict[int, tuple[np.ndarray, np.ndarray] | None] = {l: None for l in range(N_LAYERS)}
    for c in range(N_CALLS):
        new_positions = trajectory[f"call{c}.in.position_ids"]  # [1, n]
        for l in range(N_LAYERS):
            p = f"call{c}.layer{l}."
            attn = trajectory[p + "in.attn_weights"]  # [1, Hq, n, N]
            keys_in, values_in = trajectory[p + "in.key_cache"], trajectory[p + "in.value_cache"]
            H, n = keys_in.shape[1], new_positions.shape[1]
            new_pos = np.broadcast_to(new_positions[:, None, :], (1, H, n))
            if carried[l] is None:
                positions = mx.array(new_pos.astype(np.int32))
            else:
                positions = mx.concatenate([carried[l].positions, mx.array(new_pos.astype(np.int32))], axis=-1)
                # The fixture's input cache must be our previous output plus the new keys.
                old_k, old_v = kv[l]
                np.testing.assert_array_equal(keys_in[:, :, : old_k.shape[2]], old_k)
                np.testing.assert_array_equal(values_in[:, :, : old_v.shape[2]], old_v)
            averaged = gqa_mean(mx.array(attn), H, dtype="float32")
            result = namm.step(averaged, positions, carried[l])
            keys_out = np.asarray(gather_tokens(mx.array(keys_in), result.kept))
            values_out = np.asarray(gather_tokens(mx.array(values_in), result.kept))
            carried[l] = result.state
            kv[l] = (keys_out, values_out)
            yield c, l, result, positions, keys_out, values_out


@pytest.fixture(scope="module")
def replayed(namm, trajectory):
    return list(replay(namm, trajectory))


def test_trajectory_covers_all_calls_and_the_two_chunk_call(trajectory, replayed):
    assert [(c, l) for c, l, *_ in replayed] == [(c, l) for c in range(N_CALLS) for l in range(N_LAYERS)]
    assert list(trajectory["call3.in.chunk_sizes"]) == [16, 16]


@pytest.mark.parametrize("c", range(N_CALLS))
@pytest.mark.parametrize("l", range(N_LAYERS))
def test_features_match_reference(trajectory, replayed, c, l):
    _, _, result, positions, *_ = replayed[c * N_LAYERS + l]
    p = f"call{c}.layer{l}."
    f = result.features
    np.testing.assert_array_equal(np.asarray(positions), trajectory[p + "policy_position_ids"])
    stft = np.swapaxes(np.asarray(f.stft), 2, 3)  # ours [B,H,N,F,bins] -> reference [B,H,F,N,bins]
    assert_close(stft, trajectory[p + "stft_magnitudes"], "stft magnitudes", scale_atol=0)
    assert_close(f.ema, trajectory[p + "spectrogram_ema"], "spectrogram EMA", scale_atol=0)
    assert_close(f.normalized, trajectory[p + "spectrogram_normalized"], "normalised spectrum", scale_atol=0)
    np.testing.assert_array_equal(np.asarray(f.ages), trajectory[p + "recency"])
    np.testing.assert_array_equal(np.asarray(f.recency), trajectory[p + "recency_embedding"])
    assert_close(f.embedding, trajectory[p + "token_embedding"], "token embedding", scale_atol=0)


@pytest.mark.parametrize("c", range(N_CALLS))
@pytest.mark.parametrize("l", range(N_LAYERS))
def test_bam_and_scores_match_reference(trajectory, replayed, c, l):
    _, _, result, *_ = replayed[c * N_LAYERS + l]
    p = f"call{c}.layer{l}."
    assert_close(result.bam.attention_output, trajectory[p + "bam_attention_output"], "BAM attention output")
    assert_close(result.bam.gated_features, trajectory[p + "bam_mlp_input"], "BAM gated features")
    assert_close(result.scores, trajectory[p + "token_scores"], "token scores", scale_atol=1e-6)


@pytest.mark.parametrize("c", range(N_CALLS))
@pytest.mark.parametrize("l", range(N_LAYERS))
def test_eviction_and_carried_state_match_reference(trajectory, replayed, c, l):
    _, _, result, _, keys_out, values_out = replayed[c * N_LAYERS + l]
    p = f"call{c}.layer{l}."
    np.testing.assert_array_equal(np.asarray(result.kept), trajectory[p + "retained_idxs"])
    np.testing.assert_array_equal(keys_out, trajectory[p + "out.key_cache"])
    np.testing.assert_array_equal(values_out, trajectory[p + "out.value_cache"])
    np.testing.assert_array_equal(np.asarray(result.state.positions), trajectory[p + "out.cache_position_ids"])
    # The carried state is a gather of values already compared above, so it is exact
    # relative to our own features and within tolerance of the reference.
    assert_close(result.state.ema, trajectory[p + "state_out.ema_spectrogram"], "carried EMA", scale_atol=0)
    assert_close(result.state.attn_tail, trajectory[p + "state_out.prev_attn_tail"], "carried attention tail", scale_atol=0)


def test_rotary_offsets_are_token_totals(trajectory):
    totals = np.cumsum([int(trajectory[f"call{c}.in.num_new_tokens"]) for c in range(N_CALLS)])
    for c in range(N_CALLS):
        assert list(trajectory[f"call{c}.out.rotary_offset"]) == [totals[c]] * N_LAYERS


def test_constants_match_reference(reference_dir):
    constants = {k: np.asarray(v) for k, v in mx.load(str(reference_dir / "constants.safetensors")).items()}
    np.testing.assert_allclose(hann_window(32).astype(np.float32), constants["stft.window"], rtol=0, atol=2e-7)
    table = RecencyTable(NAMMConfig())
    rows = table(mx.arange(1024))
    np.testing.assert_array_equal(np.asarray(rows), constants["recency_table.rows_0_1023"])
    probes = table(mx.array(constants["recency_table.probe_positions"]))
    np.testing.assert_array_equal(np.asarray(probes), constants["recency_table.probe_rows"])


def test_flat_vector_round_trips(expected_tiny):
    vector = expected_tiny["param_vector"]
    namm = NAMM.from_flat(vector, expected_tiny["norm.mean"], expected_tiny["norm.var"])
    np.testing.assert_array_equal(namm.to_flat(), vector)
    names = [name for name, _ in namm.config.param_layout]
    for name, tensor in zip(names, namm.weights.as_list()):
        np.testing.assert_array_equal(np.asarray(tensor), expected_tiny[name], err_msg=name)


def test_parameter_layout_of_spec():
    """TV3: theta_i = i lands at the documented offsets."""
    config = NAMMConfig()
    assert config.param_size == 4172 and config.embed_dim == 25
    namm = NAMM.from_flat(np.arange(4172, dtype=np.float32), np.zeros(17), np.ones(17))
    w = [np.asarray(t) for t in namm.weights.as_list()]
    assert (w[0][0, 0], w[0][0, 1], w[0][1, 0], w[0][24, 95]) == (0, 1, 96, 2399)
    assert (w[1][0], w[2][0, 0], w[2][0, 1], w[2][1, 0]) == (2400, 2496, 2497, 2546)
    assert (w[3][0], w[3][49], w[4][0, 0], w[4][24, 0], w[5][0]) == (4096, 4145, 4146, 4170, 4171)


def test_wrong_vector_length_names_the_layout():
    with pytest.raises(ValueError, match=r"4,172 values, got 4,171.*qkv"):
        NAMM.from_flat(np.zeros(4171), np.zeros(17), np.ones(17))


def test_selection_tv4():
    """Spec TV4: shared K = max passing count, newest forced, per-head top-K."""
    scores = mx.array([[[-1, 2, -3, 0.5, -0.2, -0.7], [-5, -0.1, 1, -2, -0.3, -9]]], dtype=mx.float32)
    kept = np.asarray(select_kept(scores))
    np.testing.assert_array_equal(kept, [[[1, 3, 5], [1, 2, 5]]])
    np.testing.assert_array_equal(np.asarray(select_kept(scores, max_keep=2)), [[[1, 5], [2, 5]]])


def test_zero_namm_keeps_everything(trajectory):
    """With theta = 0 every score is exactly 0 and nothing is evicted (spec §3.4)."""
    namm = NAMM.zeros(FLOAT32)
    attn = gqa_mean(mx.array(trajectory["call0.layer0.in.attn_weights"]), 2, "float32")
    positions = mx.broadcast_to(mx.arange(128, dtype=mx.int32), (1, 2, 128))
    result = namm.step(attn, positions)
    assert np.all(np.asarray(result.scores) == 0)
    assert result.kept.shape == (1, 2, 128)


def test_bf16_inputs_are_accepted(namm, trajectory):
    """bf16 attention gives the same kept set here (the smallest |score| is 0.011)."""
    p = "call0.layer0."
    attn = gqa_mean(mx.array(trajectory[p + "in.attn_weights"]).astype(mx.bfloat16), 2, "bfloat16")
    positions = mx.array(trajectory[p + "policy_position_ids"].astype(np.int32))
    result = namm.step(attn, positions)
    assert result.scores.dtype == mx.float32
    np.testing.assert_array_equal(np.asarray(result.kept), trajectory[p + "retained_idxs"])


def test_layers_can_be_scored_stacked(namm, trajectory):
    """Leading axes are free: both layers of call 0 in one call give the per-layer scores."""
    attn = mx.stack(
        [gqa_mean(mx.array(trajectory[f"call0.layer{l}.in.attn_weights"]), 2, "float32") for l in range(2)]
    )
    positions = mx.broadcast_to(mx.arange(128, dtype=mx.int32), (2, 1, 2, 128))
    scores, *_ = namm.score(attn, positions)
    for l in range(2):
        assert_close(scores[l], trajectory[f"call0.layer{l}.token_scores"], f"stacked layer {l}")


def test_save_load_round_trip(namm, tmp_path):
    folder = namm.save(tmp_path / "namm", metadata={"source": "test"})
    loaded = NAMM.load(folder)
    np.testing.assert_array_equal(loaded.to_flat(), namm.to_flat())
    np.testing.assert_array_equal(np.asarray(loaded.norm_var), np.asarray(namm.norm_var))
    assert loaded.config == namm.config
    assert loaded.metadata["source"] == "test"
    _, meta = mx.load(str(folder / "namm.safetensors"), return_metadata=True)
    assert meta["format"] == "mlx"
