"""TrialConfig <-> MLflow params: `from_params` is the inverse of `params()` for every field.

The values are generated per field from the dataclass's own type hints, so a field added to
TrialConfig is covered here without a change (a field of a new kind of type fails `strategy`
until it gets one). Runtime fields are never logged: they come back as their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import string
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sall.config import RUNTIME_FIELDS, TrialConfig, config_from_dict

# Text a param can carry back unchanged: no "," or "=" (they separate tuple items and pairs).
TEXT = st.text(alphabet=string.ascii_letters + string.digits + "_-./: ", min_size=1, max_size=12)
HINTS = get_type_hints(TrialConfig)


def strategy(tp: Any, in_pair: bool = False) -> st.SearchStrategy:
    """Values of a field of type `tp` that a param can hold."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):  # X | None: "None" is the param of None, not a string
        inner = next(a for a in args if a is not type(None))
        return st.none() | strategy(inner).filter(lambda v: v != "None")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        elem = args[0]
        pairs = get_origin(elem) is tuple
        # an empty tuple is left out of the params (a missing param is the default), except a
        # tuple of pairs ("all"); no valid config has empty tasks
        return st.lists(strategy(elem), min_size=0 if pairs else 1, max_size=4).map(tuple)
    if origin is tuple:
        return st.tuples(*(strategy(a, in_pair=len(args) == 2 and args[0] is str) for a in args))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers()
    if tp is float:
        floats = st.floats(allow_nan=False)
        # a pair's number is written with 6 significant digits ("amd=0.0142"): what params() keeps
        return floats.map(lambda x: float(f"{x:g}")) if in_pair else floats
    if tp is str:
        return TEXT
    raise AssertionError(f"no strategy for field type {tp}: add one here")


FIELDS = {f.name: strategy(HINTS[f.name]) for f in dataclasses.fields(TrialConfig)}
CONFIGS = st.fixed_dictionaries(FIELDS).map(lambda v: TrialConfig(**v))


def logged(cfg: TrialConfig) -> TrialConfig:
    """What a run's params can give back: the experiment fields, runtime fields at their defaults."""
    return cfg.replace(**{k: getattr(TrialConfig(), k) for k in RUNTIME_FIELDS})


def test_every_field_has_a_strategy():
    assert set(FIELDS) == {f.name for f in dataclasses.fields(TrialConfig)}


@given(CONFIGS)
@settings(max_examples=300, deadline=None)
def test_from_params_inverts_params(cfg: TrialConfig):
    back = TrialConfig.from_params(cfg.params())
    assert back == logged(cfg)
    assert back.key() == cfg.key() and back.params() == cfg.params()
    for f in dataclasses.fields(TrialConfig):  # the same types, not just equal values (1 == 1.0)
        assert type(getattr(back, f.name)) is type(getattr(logged(cfg), f.name)), f.name


@given(CONFIGS)
@settings(max_examples=200, deadline=None)
def test_config_from_dict_inverts_asdict_through_json(cfg: TrialConfig):
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples become lists, as in Tune and the student file
    assert config_from_dict(d) == cfg and config_from_dict(d).key() == cfg.key()


def test_missing_param_is_the_default_and_removed_ones_are_ignored():
    """A run logged by older code lacks newer fields, and may hold fields since removed."""
    cfg = TrialConfig.from_params({"temperature": "8.0", "multitask": "False", "a_removed_field": "1"})
    assert cfg == TrialConfig(temperature=8.0, multitask=False)


def test_bad_param_names_the_field():
    from sall.errors import ConfigError

    with pytest.raises(ConfigError, match="param multitask: 'yes' is not a boolean"):
        TrialConfig.from_params({"multitask": "yes"})
    with pytest.raises(ConfigError, match="param betas"):
        TrialConfig.from_params({"betas": "0.9"})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow SQLite store and one experiment in it."""
    from tracking import client as tr

    uri = tr.resolve_uri(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
    return uri, tr.ensure_experiment(uri, "roundtrip")


@given(CONFIGS)
@settings(max_examples=8, deadline=None)
def test_round_trip_through_mlflow(store, cfg: TrialConfig):
    """Logged with the sweeps' own writer, read back with MLflow's client, as analysis/ does."""
    from mlflow.tracking import MlflowClient

    from tracking import client as tr

    uri, exp = store
    rid = tr.client(uri).create_run(exp).info.run_id
    tr.log_params(uri, rid, cfg.params())
    params = MlflowClient(tracking_uri=uri).get_run(rid).data.params
    assert TrialConfig.from_params(params) == logged(cfg)


def test_preset_backbones_are_timm_models():
    """check_backbone trusts the presets' backbones without asking timm: they must be timm's."""
    import timm

    from sall.config import PRESET_BACKBONES, check_backbone
    from sall.errors import ConfigError

    assert PRESET_BACKBONES and all(timm.is_model(name) for name in PRESET_BACKBONES)
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9000'"):
        check_backbone("resnet9000")
