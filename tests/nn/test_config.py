import pytest

from rsae.nn.config import SAEConfig


def test_hook_layer_is_parsed_from_the_hook_name() -> None:
    cfg = SAEConfig(d_in=8, d_sae=16, hook_name="blocks.15.hook_resid_post")
    assert cfg.hook_layer == 15
    assert cfg.family == "relu"


def test_round_trip_through_dict() -> None:
    cfg = SAEConfig(d_in=8, d_sae=16, architecture="rsae", family="topk", k=4, degree=(9, 8), mode="pure")
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"d_in": 0}, "d_in"),
        ({"architecture": "gelu"}, "architecture"),
        ({"architecture": "topk"}, "k"),
        ({"architecture": "topk", "k": 99}, "k"),
        ({"architecture": "rsae"}, "degree"),
        ({"architecture": "rsae", "degree": (3, 2), "mode": "soft"}, "mode"),
        ({"coefficient_sharing": "group", "n_coefficient_groups": 0}, "n_coefficient_groups"),
        ({"dtype": "int8"}, "dtype"),
        ({"architecture": "relu", "family": "topk", "k": 2}, "family"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"SAEConfig.{field}="):
        SAEConfig(**{"d_in": 8, "d_sae": 16, **kwargs})


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown SAEConfig fields"):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 16, "l1_coeff": 3})
