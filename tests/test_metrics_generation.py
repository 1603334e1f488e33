"""Generation metrics and the evaluation report, on small synthetic filament volumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from vqldm.metrics.generation import (
    POOLED_STATS,
    SCALAR_STATS,
    _ms_ssim_config,
    circular_wasserstein,
    compare,
    volume_statistics,
)
from vqldm.metrics.report import write_report

SHAPE = (32, 32, 32)


def filaments(rng, shape=SHAPE, n=4, curvature=0.05, direction=None, sigma=0.7):
    """Random (curved) bright lines, slightly blurred, peak ~0.95: a stand-in for microtubules."""
    vol = np.zeros(shape, np.float32)
    size = np.array(shape, float)
    for _ in range(n):
        start = rng.uniform(0.2, 0.8, 3) * size
        d0 = np.array(direction, float) if direction is not None else rng.normal(size=3)
        d0 /= np.linalg.norm(d0)
        amp = rng.uniform(0.6, 1.0)
        for sign in (1, -1):
            p, d = start.copy(), sign * d0
            for _ in range(int(2 * size.max())):
                d = d + rng.normal(scale=curvature, size=3)
                d /= np.linalg.norm(d)
                p = p + 0.5 * d
                i = np.round(p).astype(int)
                if (i < 0).any() or (i >= size).any():
                    break
                vol[tuple(i)] = amp
    vol = ndi.gaussian_filter(vol, sigma)
    return vol / vol.max() * 0.95 if vol.max() > 0 else vol


def straight_line(shape, start, direction, length):
    vol = np.zeros(shape, np.float32)
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    for t in np.linspace(0, length - 1, 10 * length):
        vol[tuple(np.round(np.asarray(start) + t * d).astype(int))] = 1.0
    vol = ndi.gaussian_filter(vol, 0.7)
    return vol / vol.max()


def make_set(seed, k=8, **kw):
    rng = np.random.default_rng(seed)
    return [filaments(rng, **kw) for _ in range(k)]


def axial_mean(angles):
    """Mean of axial angles in [0, pi) (doubling trick), in [0, pi)."""
    return float(np.mod(np.angle(np.mean(np.exp(2j * angles))) / 2, np.pi))


def axial_gap(a, b):
    d = abs(a - b) % np.pi
    return min(d, np.pi - d)


# ---------------------------------------------------------------- per-volume statistics


def test_straight_line_length_and_orientation():
    vol = straight_line(SHAPE, (5, 16, 16), (1, 0, 0), 20)
    s = volume_statistics(vol)
    assert abs(s["filament_length"] - 20) <= 3
    assert s["n_components"] == 1
    assert s["orientation"].shape == (s["filament_length"], 2)
    assert axial_gap(axial_mean(s["orientation_azimuth"]), 0.0) < np.radians(5)
    assert np.median(s["orientation_elevation"]) < np.radians(5)
    assert s["intensities"].min() > 0.1
    assert s["foreground_fraction"] == pytest.approx((vol > 0.1).mean())


def test_oblique_line_angles():
    d = np.array([1.0, 1.0, 1.0])
    vol = straight_line(SHAPE, (6, 6, 6), d, 20)
    s = volume_statistics(vol)
    assert axial_gap(axial_mean(s["orientation_azimuth"]), np.pi / 4) < np.radians(5)
    expected_el = np.arcsin(1 / np.sqrt(3))  # 35.3 degrees
    assert abs(np.median(s["orientation_elevation"]) - expected_el) < np.radians(5)


def test_two_blobs_are_two_components_and_specks_ignored():
    vol = np.zeros(SHAPE, np.float32)
    vol[4:8, 4:8, 4:8] = 0.8
    vol[20:25, 20:25, 20:25] = 0.6
    vol[14, 28, 2] = 0.9  # single hot voxel: below min_component_size
    assert volume_statistics(vol)["n_components"] == 2
    assert volume_statistics(vol, min_component_size=1)["n_components"] == 3


def test_empty_volume_statistics():
    s = volume_statistics(np.zeros(SHAPE, np.float32))
    assert s["foreground_fraction"] == 0 and s["filament_length"] == 0 and s["n_components"] == 0
    assert s["intensities"].size == 0 and s["orientation"].shape == (0, 2)


def test_channel_axis_accepted_and_bad_shape_rejected():
    vol = straight_line(SHAPE, (5, 16, 16), (1, 0, 0), 10)
    assert volume_statistics(vol[None])["filament_length"] == volume_statistics(vol)["filament_length"]
    with pytest.raises(ValueError, match="3D"):
        volume_statistics(np.zeros((8, 8)))


def test_circular_wasserstein_wraps():
    assert circular_wasserstein(np.full(5, 0.01), np.full(5, np.pi - 0.01)) == pytest.approx(0.02, abs=1e-9)
    assert circular_wasserstein(np.full(5, 0.0), np.full(5, np.pi / 2)) == pytest.approx(np.pi / 2, abs=1e-9)
    x = np.random.default_rng(0).uniform(0, np.pi, 100)
    assert circular_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)


def test_ms_ssim_scales_fit_small_and_anisotropic_shapes():
    w32, k32 = _ms_ssim_config((32, 32, 32))
    assert len(w32) == 3 and k32 == (7, 7, 7) and sum(w32) == pytest.approx(1.0)
    w64, _ = _ms_ssim_config((64, 64, 64))
    assert len(w64) == 4
    w, k = _ms_ssim_config((96, 96, 24))
    assert len(w) == 3 and k[2] == 5
    w, k = _ms_ssim_config((8, 8, 8))
    assert len(w) == 1
    assert _ms_ssim_config((2, 2, 2)) is None


# ---------------------------------------------------------------- compare()


@pytest.fixture(scope="module")
def real_set():
    return make_set(1)


@pytest.fixture(scope="module")
def good_metrics(real_set):
    return compare(real_set, make_set(2), seed=0)


def test_identical_sets_have_zero_distance(real_set):
    m = compare(real_set, real_set)
    for name in SCALAR_STATS + POOLED_STATS:
        s = m["statistics"][name]
        assert s["generated_vs_real"] == pytest.approx(0.0, abs=1e-9), name
        assert s["real_vs_real"] > 0, name
        assert s["ratio"] == pytest.approx(0.0, abs=1e-6), name
    assert m["mmd"]["generated_vs_real"] == pytest.approx(0.0, abs=1e-6)
    assert m["diversity"]["generated_ms_ssim"] == pytest.approx(m["diversity"]["real_ms_ssim"], abs=1e-6)
    assert m["summary"]["within_2x_floor"] is True


def test_same_generator_passes(good_metrics):
    m = good_metrics
    assert m["n_real"] == 8 and m["n_generated"] == 8 and m["threshold"] == 0.1
    assert m["summary"]["max_ratio"] < 4.0, m["summary"]
    for name in SCALAR_STATS + POOLED_STATS:
        s = m["statistics"][name]
        assert set(s) >= {"generated_vs_real", "real_vs_real", "ratio", "real_mean", "generated_mean", "units"}
    assert m["warnings"] == []


def test_json_serialisable(good_metrics):
    text = json.dumps(good_metrics, allow_nan=False)
    assert json.loads(text)["statistics"]["intensity"]["ratio"] == good_metrics["statistics"]["intensity"]["ratio"]


def test_empty_generated_fails(real_set):
    empty = [np.zeros(SHAPE, np.float32) for _ in range(4)]
    m = compare(real_set, empty)
    st = m["statistics"]
    assert st["foreground_fraction"]["ratio"] > 5
    assert st["filament_length"]["ratio"] > 5
    for name in POOLED_STATS:  # nothing to compare: explicit None plus a reason, never a silent 0
        assert st[name]["ratio"] is None and "no values" in st[name]["ratio_note"]
    assert m["summary"]["within_2x_floor"] is False
    assert "intensity" in m["summary"]["failed"]
    assert m["diversity"]["generated_ms_ssim"] > m["diversity"]["real_ms_ssim"]  # all identical: no diversity
    json.dumps(m, allow_nan=False)


def test_dense_noise_fails(real_set):
    rng = np.random.default_rng(5)
    noise = [rng.random(SHAPE).astype(np.float32) for _ in range(6)]
    m = compare(real_set, noise)
    st = m["statistics"]
    assert st["foreground_fraction"]["ratio"] > 20
    assert st["filament_length"]["ratio"] > 20
    assert st["intensity"]["ratio"] > 5
    assert m["mmd"]["ratio"] > 2
    assert m["summary"]["within_2x_floor"] is False
    assert m["diversity"]["generated_ms_ssim"] < m["diversity"]["real_ms_ssim"]


def test_orientation_x_vs_y_distinguished():
    xs = make_set(3, k=6, direction=(1, 0, 0), curvature=0.0)
    ys = make_set(4, k=6, direction=(0, 1, 0), curvature=0.0)
    m = compare(xs, ys)
    az = m["statistics"]["orientation_azimuth"]
    assert az["generated_vs_real"] > 1.0  # ~pi/2 rad apart
    assert az["ratio"] is None or az["ratio"] > 10
    assert m["statistics"]["orientation_elevation"]["generated_vs_real"] < 0.2  # both in the xy plane
    xs2 = make_set(6, k=6, direction=(1, 0, 0), curvature=0.0)
    assert compare(xs, xs2)["statistics"]["orientation_azimuth"]["generated_vs_real"] < 0.1


def test_anisotropic_volumes():
    shape = (48, 48, 24)
    m = compare(make_set(7, k=4, shape=shape), make_set(8, k=4, shape=shape))
    assert m["diversity"]["real"]["kernel_size"][2] == 5
    assert m["diversity"]["real"]["n_scales"] >= 2
    assert m["summary"]["max_ratio"] is not None


def test_needs_two_real_and_warns_for_few(real_set):
    with pytest.raises(ValueError, match="at least 2 real"):
        compare(real_set[:1], real_set)
    m = compare(real_set[:3], real_set[3:5])
    assert any("3 real volumes" in w for w in m["warnings"])
    m = compare(real_set[:4], [v * 2 - 1 for v in real_set[:2]])
    assert any("not [0,1]" in w for w in m["warnings"])


# ---------------------------------------------------------------- report


def test_write_report(tmp_path, real_set, good_metrics):
    from PIL import Image

    gen = make_set(2)
    path = write_report(tmp_path / "eval", good_metrics, real_set, gen, title="test eval")
    assert path == tmp_path / "eval" / "report.md"
    text = path.read_text()
    assert text.startswith("# test eval")
    for row in (
        "| foreground fraction |",
        "| filament length |",
        "| connected components |",
        "| orientation azimuth |",
        "| orientation elevation |",
        "| foreground intensity |",
        "| segment straightness |",
        "| segment length |",
        "| MMD",
    ):
        assert row in text, row
    table_rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ("PASS" in ln or "FAIL" in ln)]
    assert len(table_rows) == 9  # 8 statistics and MMD
    lo, hi = good_metrics["statistics"]["segment_straightness"]["ratio_interval"]
    straight = next(ln for ln in table_rows if ln.startswith("| segment straightness |"))
    assert f"({lo:.3g}-{hi:.3g})" in straight  # the ratio's bracket over the redraws
    rate = good_metrics["summary"]["redraw_pass_rate"]
    assert f"- redraws: {rate:.0%} of 100 bootstrap redraws" in text
    assert "](real_vs_generated.png)" in text and "](histograms.png)" in text
    assert "Diversity" in text and "MS-SSIM" in text
    for name in ("real_vs_generated.png", "histograms.png"):
        with Image.open(tmp_path / "eval" / name) as im:
            im.load()
            assert im.width >= 256 and im.height >= 128


def test_write_report_marks_failures_and_recomputes(tmp_path, real_set):
    empty = [np.zeros(SHAPE, np.float32) for _ in range(3)]
    m = compare(real_set, empty)
    for key in ("histograms", "per_volume"):  # e.g. a metrics.json from elsewhere: report recomputes
        m.pop(key)
    text = write_report(tmp_path, m, real_set, empty).read_text()
    assert "**Verdict: FAIL**" in text
    assert "| foreground intensity | intensity units | n/a |" in text and "undefined" in text
    assert (tmp_path / "histograms.png").stat().st_size > 0


# ------------------------------------------------------------------------------ skeleton segments
def test_segments_of_a_straight_line_a_bend_a_cross_and_a_loop():
    from skimage.morphology import skeletonize

    from vqldm.metrics.generation import skeleton_segments

    line = np.zeros((32, 32, 8), bool)
    line[5:25, 10, 4] = True
    s, length = skeleton_segments(line)
    assert s.tolist() == [1.0] and length.tolist() == [19.0]  # 20 voxels, 19 unit steps

    diag = np.zeros((32, 32, 8), bool)
    for i in range(20):
        diag[5 + i, 5 + i, 4] = True
    s, length = skeleton_segments(diag)
    assert s == pytest.approx([1.0]) and length[0] == pytest.approx(19 * np.sqrt(2))

    arc = np.zeros((64, 64, 8), bool)  # a half circle of radius 20: end-to-end / contour = 2 / pi
    for a in np.linspace(0, np.pi, 400):
        arc[int(round(32 + 20 * np.cos(a))), int(round(32 + 20 * np.sin(a))), 4] = True
    s, length = skeleton_segments(skeletonize(arc) > 0)
    assert len(s) == 1 and 0.55 < s[0] < 0.7 and 55 < length[0] < 75

    cross = np.zeros((32, 32, 8), bool)  # two crossing filaments: four straight pieces, not bent ones
    cross[4:28, 16, 4] = True
    cross[16, 4:28, 4] = True
    s, _ = skeleton_segments(cross)
    assert len(s) == 4 and np.all(s == 1.0)

    loop = np.zeros((32, 32, 8), bool)  # a closed ring has no ends: skipped
    loop[8:20, 8, 4] = loop[8:20, 19, 4] = loop[8, 8:20, 4] = loop[19, 8:20, 4] = True
    assert skeleton_segments(loop)[0].size == 0
    assert skeleton_segments(np.zeros((8, 8, 8), bool))[0].size == 0


def test_straightness_separates_stiff_from_curly_filaments():
    """The statistic the eye uses: straight filaments pass against themselves, curly ones fail."""
    from vqldm.metrics.generation import compare

    def filament_volume(seed: int, curl: float) -> np.ndarray:
        rng = np.random.default_rng(seed)
        vol = np.zeros((48, 48, 12), np.float32)
        for _ in range(3):
            p, ang = rng.uniform(8, 40, 2), rng.uniform(0, np.pi)
            for _ in range(60):
                ang += curl * rng.normal()
                p = p + 0.6 * np.array([np.cos(ang), np.sin(ang)])
                x, y = int(p[0]), int(p[1])
                if 0 <= x < 48 and 0 <= y < 48:
                    vol[x, y, 6] = 1.0
        return vol

    stiff = [filament_volume(s, 0.02) for s in range(12)]
    stiff_b = [filament_volume(100 + s, 0.02) for s in range(12)]
    curly = [filament_volume(200 + s, 0.6) for s in range(12)]
    same = compare(stiff, stiff_b, seed=0)["statistics"]["segment_straightness"]
    other = compare(stiff, curly, seed=0)["statistics"]["segment_straightness"]
    assert same["ratio"] < 2.0 < other["ratio"], (same["ratio"], other["ratio"])
    assert other["generated_mean"] < same["generated_mean"]


# ---------------------------------------------------------------- redraws (bootstrap over the generated set)


def test_redraws_bracket_the_verdict_without_moving_the_ratios(real_set, good_metrics):
    plain = compare(real_set, make_set(2), seed=0, redraws=0)
    assert "redraw_pass_rate" not in plain["summary"]
    assert "ratio_interval" not in plain["statistics"]["intensity"]
    m = good_metrics  # the default: 100 redraws
    for name in SCALAR_STATS + POOLED_STATS:  # the redraws draw from their own stream
        assert m["statistics"][name]["ratio"] == plain["statistics"][name]["ratio"], name
    for entry in [*m["statistics"].values(), m["mmd"]]:
        lo, hi = entry["ratio_interval"]
        assert 0.0 <= lo <= hi
    assert m["summary"]["redraws"]["n"] == 100
    assert 0.0 <= m["summary"]["redraw_pass_rate"] <= 1.0
    again = compare(real_set, make_set(2), seed=0)
    assert again["summary"]["redraw_pass_rate"] == m["summary"]["redraw_pass_rate"]
    assert again["statistics"]["segment_straightness"]["ratio_interval"] == \
        m["statistics"]["segment_straightness"]["ratio_interval"]


def test_redraw_pass_rate_separates_good_from_bad_samples(real_set):
    same = compare(real_set, real_set, redraws=40)["summary"]["redraw_pass_rate"]
    rng = np.random.default_rng(5)
    noise = compare(real_set, [rng.random(SHAPE).astype(np.float32) for _ in range(6)], redraws=40)
    assert same >= 0.9
    assert noise["summary"]["redraw_pass_rate"] == 0.0
    assert noise["statistics"]["foreground_fraction"]["ratio_interval"][0] > 20


def test_redraws_of_an_empty_set_all_miss(real_set):
    m = compare(real_set, [np.zeros(SHAPE, np.float32) for _ in range(4)], redraws=20)
    assert m["summary"]["redraw_pass_rate"] == 0.0
    assert "ratio_interval" not in m["statistics"]["intensity"]  # no ratio, no interval
    assert "ratio_interval" in m["statistics"]["foreground_fraction"]
    json.dumps(m, allow_nan=False)
