"""RASConfig: presets, the per-step schedule against the spec's numbers, and every invalid value."""

from __future__ import annotations

import pytest

from ras_models import RASConfig


def test_sd3_preset_ratio_half_computes_60_7_percent():
    cfg = RASConfig.sd3(sample_ratio=0.5)
    counts = cfg.token_schedule(4096)
    dense = [i for i, k in enumerate(counts) if k == 4096]
    assert dense == [0, 1, 2, 3, 12, 20]
    assert set(counts) == {4096, 2048}
    assert sum(counts) / (28 * 4096) == pytest.approx(17 / 28)  # 60.7% (spec section 5)
    assert cfg.high_ratio == 0.3 and cfg.reset_steps == (12, 20)


def test_sd3_ratio_eighth_computes_31_percent():
    counts = RASConfig.sd3(sample_ratio=0.125).token_schedule(4096)
    assert sum(counts) / (28 * 4096) == pytest.approx((6 + 22 * 0.125) / 28)
    assert round(100 * sum(counts) / (28 * 4096)) == 31


def test_lumina_preset_dynamic_schedule():
    counts = RASConfig.lumina_next().token_schedule(4096)
    # Hand-computed from the spec: group g = step // 4 drops 2048 + 256 * (g - ((30 + 4) // 4) // 2) tokens.
    expected = [4096] * 4 + [2816] * 4 + [2560] * 4 + [4096, 2304, 2304, 2304] + [2048] * 4
    expected += [1792, 1792, 4096, 1792] + [1536] * 4 + [1280, 1280]
    assert counts == expected
    assert counts[4] / 4096 == pytest.approx(0.6875) and counts[-1] / 4096 == pytest.approx(0.3125)


def test_dynamic_drop_is_floored_to_multiple_and_clipped():
    cfg = RASConfig(
        num_steps=8,
        warmup_steps=1,
        reset_steps=(),
        schedule="dynamic",
        sample_ratio=0.9,
        dynamic_step=100,
        dynamic_group=1,
        dynamic_multiple=64,
    )
    counts = cfg.token_schedule(1000)
    # skip = int(0.1 * 1000) = 100, centre = (8 + 1) // 1 // 2 = 4; step s drops 100 + 100 * (s - 4).
    drops = [max((100 + 100 * (s - 4)) // 64 * 64, 0) for s in range(1, 8)]
    assert counts == [1000] + [1000 - d for d in drops]


def test_end_step_and_static_counts():
    cfg = RASConfig(num_steps=10, warmup_steps=2, reset_steps=(5,), end_step=7, sample_ratio=0.3)
    assert [cfg.is_ras_step(i) for i in range(10)] == [False, False, True, True, True, False, True, True, False, False]
    assert cfg.active_tokens(3, 97) == 97 - int(0.7 * 97)


def test_schedule_with_no_active_token_raises():
    cfg = RASConfig(
        num_steps=30,
        warmup_steps=4,
        reset_steps=(),
        schedule="dynamic",
        sample_ratio=0.1,
        dynamic_step=256,
        dynamic_multiple=1,
    )
    with pytest.raises(ValueError, match="no token active"):
        cfg.token_schedule(1024)


@pytest.mark.parametrize("schedule", ["static", "dynamic"])
def test_shards_apply_the_counts_to_each_run(schedule):
    """With shards = P every step keeps P times what one run of N / P tokens keeps unsharded."""
    kw = dict(schedule=schedule, sample_ratio=0.3, dynamic_step=64, dynamic_multiple=16)
    sharded = RASConfig.sd3(shards=4, **kw).token_schedule(4096)
    assert sharded == [4 * k for k in RASConfig.sd3(**kw).token_schedule(1024)]
    assert sharded != RASConfig.sd3(**kw).token_schedule(4096)  # 0.3 x 1024 is not a whole number: rounding differs
    with pytest.raises(ValueError, match="shards=3 must divide the image's token count N=4096"):
        RASConfig.sd3(shards=3).token_schedule(4096)


@pytest.mark.parametrize(
    "field,value,exc",
    [
        ("sample_ratio", 0.0, ValueError),
        ("sample_ratio", 1.5, ValueError),
        ("sample_ratio", float("nan"), ValueError),
        ("num_steps", 1, ValueError),
        ("num_steps", 2.5, TypeError),
        ("warmup_steps", 0, ValueError),
        ("warmup_steps", 28, ValueError),
        ("reset_steps", (28,), ValueError),
        ("reset_steps", (-1,), ValueError),
        ("reset_steps", 12, TypeError),
        ("end_step", 2, ValueError),
        ("end_step", 28, ValueError),
        ("schedule", "cosine", ValueError),
        ("dynamic_step", -1, ValueError),
        ("dynamic_group", 0, ValueError),
        ("dynamic_multiple", 0, ValueError),
        ("metric", "var", ValueError),
        ("mode", "random", ValueError),
        ("starvation_scale", -0.1, ValueError),
        ("high_ratio", 0.0, ValueError),
        ("high_ratio", 1.01, ValueError),
        ("shards", 0, ValueError),
        ("shards", 2.0, TypeError),
        ("seed", -1, ValueError),
        ("seed", 2**31, ValueError),
        ("seed", 1.0, TypeError),
        ("seed", True, TypeError),
        ("kv_cache", "bf16", ValueError),
        ("kv_cache", "FP8", ValueError),
        ("reuse", "quadratic", ValueError),
        ("reuse", None, ValueError),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value, exc):
    with pytest.raises(exc, match=field.split("[")[0]):
        RASConfig.sd3(**{field: value})


def test_random_metric_and_seed():
    cfg = RASConfig.sd3(metric="random", seed=3)
    assert cfg.metric == "random" and cfg.seed == 3
    assert RASConfig().seed == 0
    with pytest.raises(ValueError, match="RASConfig.seed is used by metric='random' only; got seed=5 with 'std'"):
        RASConfig(metric="std", seed=5)


def test_delta_metric():
    assert RASConfig.sd3(metric="delta").metric == "delta"
    with pytest.raises(ValueError, match="RASConfig.seed is used by metric='random' only; got seed=2 with 'delta'"):
        RASConfig(metric="delta", seed=2)
