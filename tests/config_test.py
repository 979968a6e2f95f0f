import subprocess
import sys

import pytest

from bigtrain import config as config_lib
from bigtrain.config import ConfigError
from tests.conftest import REPO


def test_base_is_valid_and_locked():
    c = config_lib.base()
    config_lib.validate(c)
    with pytest.raises(AttributeError):
        c.totl_steps = 3


def test_override_types_are_parsed_by_default_type():
    c = config_lib.load(
        str(REPO / "configs/mnist1d.py"),
        [
            "total_steps=500",
            "optim.learning_rate=3e-4",
            "data.standardize=false",
            "data.synthetic_shape=(8, 8, 3)",
        ],
    )
    assert c.total_steps == 500 and isinstance(c.total_steps, int)
    assert c.optim.learning_rate == pytest.approx(3e-4)
    assert c.data.standardize is False
    assert c.data.synthetic_shape == (8, 8, 3)


def test_variant_argument_selects_model():
    c = config_lib.load(str(REPO / "configs/mnist1d.py") + ":model=mlp")
    assert c.model.name == "mlp"


@pytest.mark.parametrize(
    "key, close",
    [
        ("total_step", "total_steps"),
        ("optim.learnig_rate", "optim.learning_rate"),
        ("model.widht", "model.width"),
    ],
)
def test_unknown_key_names_closest(key, close):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'.*{close}"):
        config_lib.load(str(REPO / "configs/mnist1d.py"), [f"{key}=1"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("total_steps=abc", "total_steps='abc' is not a valid int"),
        ("optim.learning_rate=fast", "optim.learning_rate='fast' is not a valid float"),
        ("data.standardize=maybe", "not a valid bool"),
        ("total_steps=0", "total_steps=0 is invalid; valid: > 0"),
        ("optim.name=adam", "optim.name='adam' is invalid; valid: adamw | lion | sgd"),
        ("model.name=transformer", "model.name='transformer' is invalid"),
        ("loss.label_smoothing=1.5", "0 <= label_smoothing < 1"),
        ("optim", "has no value"),
        ("optim=3", "is a group of keys"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("|", r"\|")):
        config_lib.load(str(REPO / "configs/mnist1d.py"), [override])


def test_wrong_type_set_in_code_is_caught():
    c = config_lib.base()
    with pytest.raises(TypeError):
        c.total_steps = "ten"  # ConfigDict itself refuses; validate() catches what slips through
    c.unlock()
    c.model.extra = 1
    with pytest.raises(ConfigError, match="unknown config key 'model.extra'"):
        config_lib.validate(c)


def test_indivisible_batch_is_reported(tiny_config, tmp_path):
    from bigtrain import train

    tiny_config.batch_size = 30  # 8 simulated devices
    with pytest.raises(
        ConfigError,
        match="batch_size=30 is not divisible by the data-parallel size 8.*use a multiple of 8",
    ):
        train.run(tiny_config, tmp_path)


def test_mesh_bigger_than_devices_is_reported(tiny_config, tmp_path):
    from bigtrain import train

    tiny_config.mesh.data, tiny_config.mesh.fsdp = 4, 4
    with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
        train.run(tiny_config, tmp_path)


def test_cli_user_error_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigtrain.main",
            "--config",
            "configs/mnist1d.py",
            "--workdir",
            str(tmp_path),
            "--config.total_step=5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean total_steps" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()
