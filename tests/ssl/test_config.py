"""Pretraining configs: overrides, validation before training (NaN and infinities included), and every shipped YAML."""

import inspect
import re
from pathlib import Path

import pytest

from objcrop import registry
from objcrop.cli import main
from objcrop.ssl.config import (
    CHOICES,
    NUMBERS,
    OPTIONAL_PAIRS,
    PAIRS,
    ConfigError,
    build_policy,
    load_config,
    method_class,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.fixture
def data(tmp_path) -> dict[str, str]:
    """Existing stand-ins for every data path a config can name (validation only checks they exist)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "store").mkdir()
    for name in ("train.json", "labels.csv", "classes.csv"):
        (tmp_path / name).write_text("", encoding="utf-8")
    return {
        "data.annotations": str(tmp_path / "train.json"),
        "data.images": str(tmp_path / "images"),
        "data.labels_csv": str(tmp_path / "labels.csv"),
        "data.classes_csv": str(tmp_path / "classes.csv"),
        "data.proposals": str(tmp_path / "store"),
        "train.out": str(tmp_path / "run"),
    }


def sets(settings: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in settings.items()]


def test_shipped_configs_exist():
    assert len(CONFIGS) >= 7, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path, data):
    """Validation also builds the config's method (on the meta device) and its crop policy."""
    config = load_config(path, sets(data))
    assert config["method"]["name"] in registry.METHODS
    assert config["data"]["images"] == data["data.images"]


# What the README says of each shipped config: (method, policy, epochs, delta).
SHIPPED = {
    "cpu-tiny": ("moco", "obj-obj-dilate", None, None),
    "openimages-moco-scene-scene": ("moco", "scene-scene", 200, 0.2),
    "openimages-moco-obj-scene": ("moco", "obj-scene", 200, 0.2),
    "openimages-moco-obj-obj-dilate": ("moco", "obj-obj-dilate", 200, 0.2),
    "coco-moco-obj-obj-dilate": ("moco", "obj-obj-dilate", 800, 0.1),
    "coco-byol-obj-obj-dilate": ("byol", "obj-obj-dilate", None, None),
    "coco-densecl-obj-obj-dilate": ("densecl", "obj-obj-dilate", None, None),
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_shipped_config_is_what_the_readme_says(path, data):
    assert {p.stem for p in CONFIGS} == set(SHIPPED)
    method, policy, epochs, delta = SHIPPED[path.stem]
    config = load_config(path, sets(data))
    assert (config["method"]["name"], config["crops"]["policy"]) == (method, policy)
    if epochs is not None:
        assert (config["optim"]["epochs"], config["crops"]["delta"]) == (epochs, delta)


PAPER_CONFIGS = [p for p in CONFIGS if p.stem != "cpu-tiny"]  # cpu-tiny is a smoke run, not a paper setting


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_use_separate_heads_exactly_for_two_kind_policies(path, data):
    from objcrop.crops.policies import POLICIES
    from objcrop.ssl.heads import DEFAULT_KIND_TO_HEAD

    config = load_config(path, sets(data))
    two_kinds = len({DEFAULT_KIND_TO_HEAD[kind] for kind in POLICIES[config["crops"]["policy"]]}) == 2
    assert config["method"]["separate_heads"] is two_kinds


def test_the_demo_uses_separate_heads_for_two_kind_policies_and_moco_does_not_by_default(tmp_path):
    from objcrop.demo import DemoSettings, pretrain_config
    from objcrop.ssl.moco import MoCoV2

    (tmp_path / "images").mkdir()
    (tmp_path / "train.json").write_text("", encoding="utf-8")
    heads = {
        policy: pretrain_config(DemoSettings(), tmp_path, "gt", policy, tmp_path / policy)["method"]["separate_heads"]
        for policy in ("scene-scene", "obj-scene", "obj-obj-dilate")
    }
    assert heads == {"scene-scene": False, "obj-scene": True, "obj-obj-dilate": True}
    assert inspect.signature(MoCoV2).parameters["separate_heads"].default is False


def test_the_choices_of_extension_points_are_their_registries():
    assert CHOICES["data.format"] == registry.FORMATS.names()
    assert CHOICES["crops.policy"] == registry.POLICIES.names()
    assert CHOICES["crops.augment"] == registry.AUGMENTS.names()
    assert CHOICES["method.name"] == registry.METHODS.names()
    for name in registry.METHODS:
        assert method_class(name) is registry.METHODS[name]
    listed = ", ".join(registry.METHODS)
    with pytest.raises(ConfigError, match=f"^method.name: unknown method 'simclr'; choose from {listed}$"):
        method_class("simclr")


def test_overrides_are_parsed_as_yaml(data):
    config = load_config(
        None,
        sets(data)
        + [
            "optim.lr=1e-3",
            "crops.scene_scale=[0.1, 0.9]",
            "optim.max_steps=null",
            "train.deterministic=true",
            "method.queue_size=4096",
            "train.threads=2",
        ],
    )
    assert config["optim"]["lr"] == pytest.approx(0.001) and isinstance(config["optim"]["lr"], float)
    assert config["crops"]["scene_scale"] == [0.1, 0.9]
    assert config["optim"]["max_steps"] is None
    assert config["train"]["deterministic"] is True
    assert config["method"] == {"name": "moco", "queue_size": 4096}
    assert config["train"]["threads"] == 2


def test_yaml_file_reads_exponents_without_a_dot(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 3\nmethod:\n  name: byol\n  base_tau: 99e-2\n", encoding="utf-8")
    config = load_config(path, [*sets(data), "optim.weight_decay=1.5e-6"])
    assert config["optim"]["weight_decay"] == pytest.approx(1.5e-6)
    assert config["method"]["base_tau"] == pytest.approx(0.99)
    assert config["optim"]["epochs"] == 3


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.lr=0.1", "optimizer: unknown config section"),
        ("optim.learning_rate=0.1", "optim.learning_rate: unknown key"),
        ("crops.policy=obj-obj-random", "crops.policy: 'obj-obj-random' is not one of"),
        ("method.name=simclr", "method.name: 'simclr' is not one of"),
        ("data.format=pascal", "data.format: 'pascal' is not one of coco, voc"),
        ("crops.augment=simclr", "crops.augment: 'simclr' is not one of"),
        ("train.precision=fp8", "train.precision"),
        ("method.queue_sise=1024", "method.queue_sise: not a parameter of MoCoV2"),
        ("method.backbone=vgg16", "method.backbone: MoCoV2(backbone='vgg16'): unknown backbone"),
        ("optim.batch_size=0", "optim.batch_size: expected an integer >= 1"),
        ("optim.epochs=2.5", "optim.epochs: expected an integer"),
        ("optim.momentum=fast", "optim.momentum: expected a finite number"),
        ("train.workers=-1", "train.workers: expected an integer >= 0"),
        ("train.deterministic=maybe", "train.deterministic: expected true or false"),
        ("crops.scene_scale=[0.5]", "crops.scene_scale: expected a pair"),
        ("crops.scene_scale=[0.9, 0.5]", "crops.scene_scale: expected 0 < lo <= hi <= 1"),
        ("data.proposals=/nonexistent/store", "data.proposals"),
        ("data.images=/nonexistent/images", "data.images: file or folder not found: /nonexistent/images"),
        ("optim.lr", "expected key=value"),
        ("lr=0.1", "keys are section.key"),
        ("optim.lr=[0.1", "not valid YAML"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_key(data, override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(None, [*sets(data), override])


def test_bad_method_parameter_for_another_method(data):
    with pytest.raises(ConfigError, match="method.queue_size: not a parameter of BYOL"):
        load_config(None, [*sets(data), "method.name=byol", "method.queue_size=1024"])


def test_fp16_on_cpu_is_rejected_up_front(data):
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a GPU"):
        load_config(None, [*sets(data), "train.device=cpu", "train.precision=fp16"])


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="a config must be a mapping"):
        load_config(listed)


@pytest.mark.parametrize("override", ["optim.bogus=1", "method.queue_sise=8", "crops.policy=nope"])
def test_cli_stops_before_training_and_creates_no_run_folder(tmp_path, data, capsys, override):
    config = CONFIGS[0]
    code = main(["pretrain", "--config", str(config), *[f"--set={s}" for s in sets(data)], "--set", override])
    assert code == 2
    assert override.split("=")[0] in capsys.readouterr().err
    assert not Path(data["train.out"]).exists()


def test_cli_check_prints_the_merged_config(tmp_path, data, capsys):
    code = main(["pretrain", "--config", str(CONFIGS[0]), *[f"--set={s}" for s in sets(data)], "--check"])
    assert code == 0
    assert '"proposals"' in capsys.readouterr().out
    assert not Path(data["train.out"]).exists()


# ------------------------------------------------------------------ NaN, infinities and bad numbers

NON_FINITE = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}


@pytest.mark.parametrize("value", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize("key", sorted(NUMBERS))
def test_every_numeric_key_rejects_nan_and_infinities(data, key, value):
    """``value < minimum`` is False for NaN, and int(inf) raises OverflowError: both must be ConfigErrors."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected"):
        load_config(None, [*sets(data), f"{key}={value}"])


PAIR_KEYS = sorted([*PAIRS, *OPTIONAL_PAIRS, "crops.object_scale"])


@pytest.mark.parametrize("value", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("key", PAIR_KEYS)
def test_every_pair_rejects_nan_and_infinities(data, key, position, value):
    pair = ["0.5", "0.5"]
    pair[position] = value
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected a pair of finite numbers"):
        load_config(None, [*sets(data), f"{key}=[{', '.join(pair)}]"])


def numeric_method_parameters():
    """(method, parameter, default) for every int or float keyword of every method."""
    found = []
    for name in CHOICES["method.name"]:
        for param in inspect.signature(method_class(name).__init__).parameters.values():
            default = param.default
            if isinstance(default, int | float) and not isinstance(default, bool):
                found.append((name, param.name))
    return found


@pytest.mark.parametrize("value", NON_FINITE.values(), ids=NON_FINITE.keys())
@pytest.mark.parametrize(("method", "param"), numeric_method_parameters())
def test_every_numeric_method_parameter_rejects_nan_and_infinities(data, method, param, value):
    with pytest.raises(ConfigError, match=rf"^method\.{param}: NaN and infinite values are not allowed"):
        load_config(None, [*sets(data), f"method.name={method}", f"method.{param}={value}"])


def test_numeric_method_parameters_were_found():
    assert len(numeric_method_parameters()) >= 10


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("method.dim=-1", "method.dim: MoCoV2(dim=-1): "),  # a RuntimeError of the meta build
        ("method.queue_size=[.nan]", "method.queue_size: NaN and infinite"),
        ("optim.max_steps=.inf", "optim.max_steps: expected an integer >= 1 or null, got inf"),
        ("optim.epochs=true", "optim.epochs: expected an integer"),
        ("optim.lr=0", "optim.lr: expected a finite number > 0"),
        ("crops.scene_ratio=[0, 1]", "crops.scene_ratio: expected 0 < lo <= hi"),
        ("crops.shift_radius=[100, 80]", "crops.shift_radius: expected 0 <= lo <= hi"),
        ("crops.scene_scale=[0.5, 1.5]", "crops.scene_scale: expected 0 < lo <= hi <= 1"),
        ("crops.scene_scale=abc", "crops.scene_scale: expected a pair of numbers"),
        ("crops.object_scale=[0, 1]", "crops.object_scale: expected 0 < lo <= hi <= 1"),
        ("crops.object_scale=dataset", "crops.object_scale: 'dataset' is not one of paper, per-region or a pair"),
        ("crops.object_scale=null", "write per-region"),
        ("crops.object_scale_cap=0", "crops.object_scale_cap: expected a finite number > 0 and <= 1"),
        ("crops.object_scale_cap=1.5", "crops.object_scale_cap: expected a finite number > 0 and <= 1"),
        ("crops.object_scale_cap=.nan", "crops.object_scale_cap: expected a finite number"),
    ],
)
def test_more_bad_values_name_their_key(data, override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(None, [*sets(data), override])


def test_integral_floats_of_integer_keys_become_ints(data):
    config = load_config(None, [*sets(data), "optim.max_steps=1e3", "optim.epochs=3.0"])
    assert config["optim"]["max_steps"] == 1000 and isinstance(config["optim"]["max_steps"], int)
    assert config["optim"]["epochs"] == 3 and isinstance(config["optim"]["epochs"], int)


def test_the_cli_reports_a_nan_learning_rate_with_exit_code_2(tmp_path, data, capsys):
    code = main(["pretrain", "--config", str(CONFIGS[0]), *[f"--set={s}" for s in sets(data)], "--set=optim.lr=.nan"])
    assert code == 2
    assert "optim.lr: expected a finite number" in capsys.readouterr().err
    assert not Path(data["train.out"]).exists()


# ------------------------------------------------------------------ crops.object_scale


@pytest.mark.parametrize(
    ("setting", "expected"), [(None, "paper"), ("per-region", "per-region"), ("[0.3, 0.8]", (0.3, 0.8))]
)
def test_object_scale_modes_and_pairs_reach_the_policy(data, setting, expected):
    overrides = [*sets(data), "crops.object_scale_cap=0.7"]
    if setting is not None:
        overrides.append(f"crops.object_scale={setting}")
    config = load_config(None, overrides)
    policy = build_policy(config["crops"])
    assert policy.object_scale == expected
    assert policy.object_scale_cap == pytest.approx(0.7)


def test_the_derived_object_scale_of_a_saved_config_is_dropped_on_input(tmp_path, data):
    saved = tmp_path / "saved.yaml"
    saved.write_text("crops:\n  object_scale_resolved: [0.45, 1.0]\n", encoding="utf-8")
    config = load_config(saved, sets(data))
    assert "object_scale_resolved" not in config["crops"]
    assert load_config(None, [*sets(data), "crops.object_scale_resolved=bogus"])["crops"]["object_scale"] == "paper"
