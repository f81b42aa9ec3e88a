import pytest

from gfmfr.config import ConfigError, RunConfig, apply_overrides, from_dict, load_toml, to_dict


def test_defaults_round_trip():
    cfg = RunConfig()
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.federation.local_epochs == 1 and cfg.federation.num_negatives == 4
    assert cfg.eval.ks == (10, 20, 50)


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[model]\nname = "fcf"\ndim = 16\n[eval]\nks = [5, 10]\n')
    values = apply_overrides(load_toml(path), ["federation.rounds=7", "model.hidden=8,4", "data.rating_threshold=none"])
    cfg = from_dict(values)
    assert cfg.seed == 3 and cfg.model.name == "fcf" and cfg.model.dim == 16
    assert cfg.federation.rounds == 7 and cfg.model.hidden == (8, 4) and cfg.eval.ks == (5, 10)
    assert cfg.data.rating_threshold is None


def test_bad_keys_and_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="model.*unknown key.*lrr"):
        from_dict({"model": {"lrr": 1}})
    with pytest.raises(ConfigError, match="federation.rounds"):
        from_dict(apply_overrides({}, ["federation.rounds=many"]))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_toml(bad)


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 1  # type: ignore[misc]


def test_to_toml_round_trips(tmp_path):
    from gfmfr.config import from_dict, load_toml, to_toml

    cfg = from_dict(
        {
            "seed": 3,
            "model": {"name": "fcf", "lr": 0.5, "hidden": [16, 8]},
            "plugin": "gfmfr",
            "gfmfr": {"modalities": ["text"], "content_dim": None},
            "federation": {"server_optimizer": "fedadam"},
        }
    )
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert from_dict(load_toml(path)) == cfg


@pytest.mark.parametrize(
    "key, bad",
    [
        ("gfmfr.fusion", "mpl"),
        ("plugin", "gfmrf"),
        ("model.name", "fmc"),
        ("gfmfr.modalities", "text,audio"),
        ("federation.server_optimizer", "adam"),
    ],
)
def test_a_bad_choice_fails_on_load_naming_key_and_allowed_values(key, bad):
    with pytest.raises(ConfigError, match=rf"{key.split('.')[-1]}: must be one of .*got '{bad.split(',')[-1]}'"):
        from_dict(apply_overrides({}, [f"{key}={bad}"]))


def test_a_bad_choice_on_the_command_line_is_one_line_and_exit_2(capsys, caplog):
    from gfmfr.cli import main

    assert main(["run", "--set", "gfmfr.fusion=mpl"]) == 2
    assert "gfmfr.fusion: must be one of 'sum', 'mlp'" in capsys.readouterr().err


def test_a_retired_key_is_an_error_that_says_what_to_write():
    from gfmfr.config import from_dict

    with pytest.raises(
        ConfigError, match=r"config.federation.client_chunk: no longer a setting; write runtime.client_chunk"
    ):
        from_dict({"federation": {"client_chunk": 7}})
    with pytest.raises(ConfigError, match=r"gfmfr.distill: no longer a setting; delete it"):
        from_dict({"gfmfr": {"distill": True}})
    with pytest.raises(ConfigError, match=r"config.plugin: 'mmx' is a model wrapper: write wrapper"):
        from_dict({"plugin": "mmx"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['regroup_every'\]"):
        from_dict({"gfmfr": {"regroup_every": 1}})


def test_example_configs_load():
    from pathlib import Path

    from gfmfr.config import from_dict, load_toml

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        from_dict(load_toml(path), where=str(path))


def _fields():
    import dataclasses

    from gfmfr.config import RunConfig

    out = []
    for f in dataclasses.fields(RunConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += [(f.name, g.name) for g in dataclasses.fields(default)]
        else:
            out.append((None, f.name))
    return out


def _values():
    from hypothesis import strategies as st

    scalar = st.one_of(
        st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
    )
    return st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(st.text(max_size=4), scalar, max_size=2))


def test_random_config_values_raise_only_config_errors():
    """Any value, of any type, at any key (and unknown keys): the config loads or raises ConfigError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gfmfr.config import ConfigError

    sections = [(None, s) for s in ("data", "model", "federation", "gfmfr", "runtime")]  # a whole section replaced

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(_fields() + sections + [("federation", "no_such_key"), (None, "no_such_key")]), _values())
    def check(key, value):
        section, name = key
        values = {name: value} if section is None else {section: {name: value}}
        try:
            from_dict(values)
        except ConfigError:
            pass

    check()


def test_what_a_run_reads_decides_whether_two_configs_are_the_same_run():
    """A stored run is reused, and reported as the plan's, when the settings it reads are the plan's:
    popularity reads no federation settings; FCF does, and no GFMFR settings without the plug-in."""
    from gfmfr.config import bearing_dict

    pop = from_dict({"model": {"name": "popularity"}})
    assert bearing_dict(pop) == bearing_dict(
        from_dict({"model": {"name": "popularity"}, "federation": {"early_stop_patience": 5}})
    )
    assert bearing_dict(pop) != bearing_dict(from_dict({"model": {"name": "popularity"}, "eval": {"ks": [5]}}))
    fcf = from_dict({"model": {"name": "fcf"}})
    assert bearing_dict(fcf) != bearing_dict(
        from_dict({"model": {"name": "fcf"}, "federation": {"early_stop_patience": 5}})
    )
    assert bearing_dict(fcf) == bearing_dict(from_dict({"model": {"name": "fcf"}, "gfmfr": {"groups": 3}}))
    assert bearing_dict(fcf) == bearing_dict(from_dict({"model": {"name": "fcf", "fedrap_lambda": 0.5}}))
    rap = from_dict({"model": {"name": "fedrap"}})
    assert bearing_dict(rap) != bearing_dict(from_dict({"model": {"name": "fedrap", "fedrap_lambda": 0.5}}))


def test_the_score_baselines_config_knows_are_the_models_that_score_without_training():
    from gfmfr.config import SCORE_BASELINES
    from gfmfr.models import BASELINES

    assert set(SCORE_BASELINES) == set(BASELINES)


def test_a_stored_config_is_read_through_todays_schema():
    """A field added since a run was stored takes its default; a retired one makes it another run unless
    its value means what today's code computes."""
    from gfmfr.config import from_stored, to_dict

    old = to_dict(from_dict({"plugin": "gfmfr", "federation": {"rounds": 100}}))
    del old["gfmfr"]["content_prior"]
    assert from_stored(old).gfmfr.content_prior == from_dict({}).gfmfr.content_prior
    old["model"]["fedrap_head"] = "dot"  # retired, with the value today's FedRAP computes: the same run
    assert from_stored(old) == from_dict({"plugin": "gfmfr", "federation": {"rounds": 100}})
    old["model"]["fedrap_head"] = "mlp"  # retired, with a value no longer computed: another run
    with pytest.raises(ConfigError, match="fedrap_head"):
        from_stored(old)
    old["model"]["fedrap_head"] = "dot"
    old["federation"]["loss_average"] = "batch"
    with pytest.raises(ConfigError, match="loss_average"):
        from_stored(old)


def test_the_configuration_reference_is_the_code():
    """docs/config.md is generated from the config dataclasses: every field is there with its default and
    its docstring, and the committed file is what ``python -m gfmfr.docs`` writes today."""
    import dataclasses

    from gfmfr import config
    from gfmfr.docs import OUT, main, render

    text = render()
    for section in (config.DataConfig, config.GFMFRConfig, config.PrivacyConfig):
        for f in dataclasses.fields(section):
            assert f"| `{f.name}` |" in text
    assert "| `content_prior` | float | `20.0` |" in text
    assert main(["--check"]) == 0, f"{OUT} is out of date: run python -m gfmfr.docs"
