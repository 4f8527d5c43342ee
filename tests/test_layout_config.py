import pytest

from moga.attention import MoGAConfig, TokenLayout


def test_layout_shots_and_ranges():
    lay = TokenLayout(7, 3, 5, (2, 4, 1))
    assert lay.num_tokens == 7 * 15
    assert lay.shot_ranges == ((0, 2), (2, 6), (6, 7))
    assert lay.shot_token_ranges == ((0, 30), (30, 90), (90, 105))
    assert [lay.shot_of_frame(f) for f in range(7)] == [0, 0, 1, 1, 1, 1, 2]
    assert TokenLayout(4, 2, 2).shot_frames == (4,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(frames=0, height=2, width=2), "frames"),
    (dict(frames=4, height=-1, width=2), "height"),
    (dict(frames=4, height=2, width=2, shot_frames=(1, 2)), "sum"),
    (dict(frames=3, height=2, width=2, shot_frames=(3, 0)), "at least one"),
])
def test_layout_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenLayout(**kwargs)


def test_layout_token_check():
    with pytest.raises(ValueError, match="tokens"):
        TokenLayout(2, 2, 2).check_tokens(9)


def test_config_validation_and_window_parse():
    assert MoGAConfig().window == (0, 2, 2)
    assert MoGAConfig.parse_window("2x3") == (0, 2, 3)
    assert MoGAConfig.parse_window("4,8,8") == (4, 8, 8)
    for bad in ("x", "1,2", "a,b,c"):
        with pytest.raises(ValueError, match="window"):
            MoGAConfig.parse_window(bad)
    with pytest.raises(ValueError, match="window"):
        MoGAConfig(window=(0, -2, 2))
    with pytest.raises(ValueError, match="branch"):
        MoGAConfig(routed=False, windowed=False, per_frame=False)
    with pytest.raises(ValueError, match="num_groups"):
        MoGAConfig(num_groups=0)
