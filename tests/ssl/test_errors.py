"""objcrop.ssl.errors holds the pretraining errors; the modules that raised them first still export them."""

import importlib

import pytest

from objcrop.cli import EXIT_CODES
from objcrop.ssl import errors


@pytest.mark.parametrize(
    ("old_module", "name"),
    [("objcrop.ssl.config", "ConfigError"), ("objcrop.ssl.checkpoint", "CheckpointError"),
     ("objcrop.ssl.trainer", "NonFiniteLossError")],
)  # fmt: skip
def test_the_old_import_paths_give_the_same_classes(old_module, name):
    module = importlib.import_module(old_module)
    assert getattr(module, name) is getattr(errors, name)


def test_config_errors_are_value_errors_so_the_cli_exits_2():
    assert issubclass(errors.ConfigError, ValueError)
    assert any(kind is ValueError and code == 2 for kind, code, _ in EXIT_CODES)
