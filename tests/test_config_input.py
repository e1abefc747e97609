"""Config input found wrong by users gets one line naming the file (or the command line), the key and
the value, exit code 2, before anything is built or written: config files that cannot be read or
are not YAML (with the problem's line and column), keys given twice in one mapping, NaN or infinite
numbers (each float, list items too, refused as it is read), YAML 1.1's booleans and numbers where
a string is expected (shown as written, with how to quote them), empty values, settings that
crashed after the networks were built (discriminator heads of no width or no blocks, Adam betas
outside [0, 1), a negative weight decay) and seeds torch cannot take. A key overridden twice takes
the last, as ``--print-config`` shows."""

from __future__ import annotations

import glob
import os
import re

import pytest

from adm_megatron.cli import main
from adm_megatron.config import ConfigError, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "cogvideox", "toy_adm.yaml")
REPORTED = ("--config", TOY, "train.max_iterations=1", "output_dir=outputs/err/X")  # the user's command


def _refused(capsys, monkeypatch, tmp_path, *args: str) -> str:
    """``adm-megatron train *args`` run in ``tmp_path``: exit code 2, one line on stderr (returned),
    no process group and nothing written."""
    import torch.distributed as dist

    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adm-megatron: config error: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == before
    assert not dist.is_initialized()
    return err.removeprefix("adm-megatron: config error: ").rstrip("\n")


@pytest.mark.parametrize("example", sorted(glob.glob(os.path.join(ROOT, "examples", "*", "*.yaml"))))
def test_every_example_config_loads(example):
    """No example gives a key twice or a value the checks refuse."""
    load_config(example)


def test_no_two_examples_and_not_make_demo_share_an_output_dir():
    """Each example runs into a directory of its own: a second run into another's output_dir is
    refused (another config) or resumes it, so README's commands, run in order, would collide."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        demo = re.search(r"^DEMO_OUT \?= (\S+)$", f.read(), re.MULTILINE).group(1)
    seen = {os.path.normpath(demo): "make demo"}
    for example in sorted(glob.glob(os.path.join(ROOT, "examples", "*", "*.yaml"))):
        out = os.path.normpath(load_config(example).output_dir)
        assert out not in seen, f"{example} and {seen[out]} share output_dir {out}"
        seen[out] = example


@pytest.mark.parametrize("text, message", [
    ("model:\n  teacher: x\ndistill:\n  generator_steps: 2\n  generator_steps: 7\n",
     "line 5, column 3: duplicate key 'generator_steps' (first at line 4)"),
    ("model:\n  teacher: x\ntrain:\n  max_iterations: 1\nmodel:\n  dtype: fp32\n",
     "line 5, column 1: duplicate key 'model' (first at line 1)"),
    ("model:\n  teacher: x\ndistill:\n  guidance_scale: [1, 2\n  ttur: 1\n",
     "line 5, column 7: expected ',' or ']', but got ':' (while parsing a flow sequence at line 4, column 19)"),
    ("model: {teacher: x\n", "line 2, column 1: expected ',' or '}', but got '<stream end>' "
                             "(while parsing a flow mapping at line 1, column 8)"),
    ("model:\n  teacher: x\n dtype: fp32\n", "line 3, column 2: expected <block end>, but found "
                                            "'<block mapping start>' (while parsing a block mapping at line 1, column 1)"),
    ("model:\n  teacher: x: y\n", "line 2, column 13: mapping values are not allowed here"),
    ("model:\n\tteacher: x\n", "line 2, column 1: found character '\\t' that cannot start any token (while "
                             "scanning for the next token)"),  # a tab: a scanner error without a context mark
])
def test_yaml_mistakes_are_named_with_their_line_and_column(text, message, capsys, monkeypatch, tmp_path):
    """A second ``model:`` section wiped the first, a repeated key kept its last value silently, and a
    syntax error lost its place (``not valid YAML (while parsing a flow sequence)``)."""
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert _refused(capsys, monkeypatch, tmp_path, "--config", str(config)) == f"{config}: not valid YAML: {message}"


def test_a_key_given_twice_in_an_overrides_mapping_is_refused(capsys, monkeypatch, tmp_path):
    assert _refused(capsys, monkeypatch, tmp_path, "--config", TOY, "optim.generator={lr: 1.0e-3, lr: 2.0e-3}") == (
        "command line: optim.generator={lr: 1.0e-3, lr: 2.0e-3}: line 1, column 14: duplicate key 'lr' "
        "(first at line 1)")


def test_a_merge_key_is_not_a_duplicate(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  <<: {teacher: base, dtype: fp32}\n  teacher: mine\n")
    assert load_config(str(config)).model.teacher == "mine"


def test_a_config_that_cannot_be_read_is_named_with_the_reason(capsys, monkeypatch, tmp_path):
    """A directory was reported as not found; a file without read permission (chmod 000) or not
    UTF-8 gave a traceback."""
    folder = tmp_path / "configs"
    folder.mkdir()
    assert _refused(capsys, monkeypatch, tmp_path, "--config", str(folder)) == (
        f"{folder}: cannot read the config file: Is a directory")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"model:\n  teacher: x\n# caf\xe9\n")
    assert _refused(capsys, monkeypatch, tmp_path, "--config", str(latin1)) == (
        f"{latin1}: not UTF-8 text (byte 0xe9 on line 3); save it as UTF-8")
    assert _refused(capsys, monkeypatch, tmp_path, "--config", str(tmp_path / "missing.yaml")) == (
        f"{tmp_path / 'missing.yaml'}: config file not found")
    locked = tmp_path / "locked.yaml"
    locked.write_text("model: {teacher: x}\n")
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it all the same: fail its open as it fails for anyone else
        def denied(path, *args, **kwargs):
            raise PermissionError(13, os.strerror(13), path)

        monkeypatch.setattr("adm_megatron.config.open", denied, raising=False)
    assert _refused(capsys, monkeypatch, tmp_path, "--config", str(locked)) == (
        f"{locked}: cannot read the config file: Permission denied")


@pytest.mark.parametrize("override, message", [
    ("logging.wandb_name=off",
     "logging.wandb_name=off: expected a string; YAML reads off as false: quote it ('logging.wandb_name=\"off\"' on a shell)"),
    # a key of fixed values that "off" quoted is none of: the values, not a quoting hint that leads nowhere
    ("logging.wandb_mode=off", "logging.wandb_mode=off: expected one of offline, online, disabled"),
    ("model.teacher=yes",
     "model.teacher=yes: expected a string; YAML reads yes as true: quote it ('model.teacher=\"yes\"' on a shell)"),
    ("output_dir=2024",
     "output_dir=2024: expected a string; YAML reads 2024 as a number: quote it ('output_dir=\"2024\"' on a shell)"),
    ("optim.generator={decay_style: off}",
     "optim.generator.decay_style=off: expected one of constant, linear, cosine, inverse-square-root"),
    ("optim.fake_score.offload=no", "optim.fake_score.offload=no: expected one of none, optimizer, optimizer_and_params"),
    ("logging.profile.mode=on", "logging.profile.mode=on: expected one of torch, nsys"),
    ("model.lora.target_modules=[to_q, on]",
     "model.lora.target_modules[1]=on: expected a string; YAML reads on as true: quote it (\"on\")"),
    ("train.max_iterations=", "train.max_iterations is empty: expected an integer"),
    ("output_dir=", "output_dir is empty: expected a string"),
    ("model.teacher=null", "model.teacher=null: expected a string"),
    ("output_dir=2024-01-01",
     "output_dir=2024-01-01: expected a string; YAML reads 2024-01-01 as a date: quote it ('output_dir=\"2024-01-01\"' "
     "on a shell)"),
    # YAML 1.1's other bases: the run went on with another number, silently
    ("seed=0123", "seed=0123: YAML reads 0123 as 83 (a number in base 8); write the number in decimal, without leading "
                  "zeros"),
    ("train.max_iterations=1:30", "train.max_iterations=1:30: YAML reads 1:30 as 90 (a number in base 60); write the "
                                  "number in decimal, without leading zeros"),
    ("optim.generator.lr=1:30.5", "optim.generator.lr=1:30.5: YAML reads 1:30.5 as 90.5 (a number in base 60); write "
                                  "the number in decimal, without leading zeros"),
    # what YAML drops of a command-line value: the run trained into output_dir=/tmp/run, named "y"
    ("output_dir=/tmp/run #1", "output_dir=/tmp/run #1: YAML reads '#1' as a comment and drops it; leave it out, or "
                               "quote a text that holds it ('output_dir=\"/tmp/run #1\"' on a shell)"),
    ("logging.wandb_name=&x y", "logging.wandb_name=&x y: YAML reads '&x' as an anchor and drops it; leave it out, or "
                                "quote a text that holds it ('logging.wandb_name=\"&x y\"' on a shell)"),
])
def test_yaml_11_booleans_and_numbers_where_a_string_is_expected_are_explained(override, message, capsys,
                                                                               monkeypatch, tmp_path):
    """``logging.wandb_mode=off`` was reported as ``logging.wandb_mode=False: expected a string``,
    ``train.max_iterations=`` as ``=None``; then with a hint to quote it, which only led to ``expected
    one of``. Numbers YAML 1.1 reads in base 8 or 60, and the parts of a value it drops (a comment, an
    anchor), were taken silently."""
    assert _refused(capsys, monkeypatch, tmp_path, *REPORTED, override) == f"command line: {message}"


@pytest.mark.parametrize("text, message", [
    ("logging:\n  wandb_name: off\n", 'logging.wandb_name=off: expected a string; YAML reads off as false: quote it ("off")'),
    ("logging:\n  wandb_mode: off\n", "logging.wandb_mode=off: expected one of offline, online, disabled"),
    ("output_dir: 1.5\n", 'output_dir=1.5: expected a string; YAML reads 1.5 as a number: quote it ("1.5")'),
    ("train:\n  max_iterations:\n", "train.max_iterations is empty: expected an integer"),
    ("model:\n  teacher: ~\n", "model.teacher=null: expected a string"),
    ("seed: 0123\n", "seed=0123: YAML reads 0123 as 83 (a number in base 8); write the number in decimal, without "
                     "leading zeros"),
    ("distill:\n  pixel_layers: [3, 06, 9]\n", "distill.pixel_layers[1]=06: YAML reads 06 as 6 (a number in base 8); "
                                                "write the number in decimal, without leading zeros"),
])
def test_a_files_yaml_11_values_are_shown_as_written(text, message, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(config))
    assert str(err.value) == f"{config}: {message}"


def test_an_empty_value_clears_a_string_key_whose_default_is_empty(capsys):
    """A key a config file set could not be cleared on the command line: ``model.generator_init=``
    (YAML reads the empty text as null) was refused as empty though the key's default is ''. Where ''
    is no default (``output_dir=``, above) it is still refused."""
    stage2 = os.path.join(ROOT, "examples", "cogvideox", "dmdx_stage2_adm.yaml")
    assert load_config(stage2).model.generator_init
    config = load_config(stage2, ["model.generator_init=", "logging.wandb_name= ", "model.pipeline="])
    assert (config.model.generator_init, config.logging.wandb_name, config.model.pipeline) == ("", "", "")
    assert config.where("model.generator_init") == "command line"
    assert main(["train", "--config", stage2, "model.generator_init=", "--print-config"]) == 0
    assert "  generator_init: ''\n" in capsys.readouterr().out


def test_quoted_the_values_are_strings():
    config = load_config(None, ['model.teacher="yes"', "output_dir='2024'", 'model.lora.target_modules=[to_q, "on"]'])
    assert (config.model.teacher, config.output_dir, config.model.lora.target_modules) == ("yes", "2024", ["to_q", "on"])
    with pytest.raises(ConfigError, match=r"^command line: logging.wandb_mode='off': expected one of offline, online"):
        load_config(None, ["model.teacher=x", 'logging.wandb_mode="off"'])


@pytest.mark.parametrize("override, shown", [
    ("optim.generator.lr=inf", "optim.generator.lr=inf"),  # trained to rc=0, exporting NaN weights
    ("optim.generator.lr=nan", "optim.generator.lr=nan"),  # reported as a min_lr error, blaming the file
    ("optim.fake_score.grad_clip=nan", "optim.fake_score.grad_clip=nan"),  # clipping silently off
    ("train.save_interval_minutes=nan", "train.save_interval_minutes=nan"),
    ("distill.gan_weight=nan", "distill.gan_weight=nan"),
    ("distill.latent_weight=nan", "distill.latent_weight=nan"),
    ("optim.generator.weight_decay=nan", "optim.generator.weight_decay=nan"),  # a traceback
    ("parallel.timeout_s=nan", "parallel.timeout_s=nan"),  # a traceback
    ("optim.discriminator.lr=-Infinity", "optim.discriminator.lr=-Infinity"),
    ("optim.generator.lr=1e999", "optim.generator.lr=1e999"),  # past float's range
    ("distill.guidance_scale=[1.5, .inf]", "distill.guidance_scale[1]=.inf"),
    ("distill.dmd_t_range=[.nan, 0.9]", "distill.dmd_t_range[0]=.nan"),
    ("optim.generator={betas: [0, -.inf]}", "optim.generator.betas[1]=-.inf"),
])
def test_nan_and_infinite_numbers_are_refused_as_read(override, shown, capsys, monkeypatch, tmp_path):
    """Range checks written with < and <= never fail on NaN, and inf passes every lower bound."""
    message = _refused(capsys, monkeypatch, tmp_path, *REPORTED, override)
    assert message == f"command line: {shown}: expected a finite number"


@pytest.mark.parametrize("override, message", [
    # a key with a digit (fp8) was not recognised as one, and the layout's message led with no key
    ("model.fp8=hybrid", "model.fp8=hybrid: FP8 runs in Transformer Engine's linears"),
    ("parallel.tensor_parallel=3", "parallel.tensor_parallel=3 x parallel.context_parallel=1: the world size 1 is not "
                                   "divisible by 3"),
])
def test_checks_made_once_the_teacher_is_read_say_where_the_key_was_set(override, message, capsys, monkeypatch,
                                                                        tmp_path):
    teacher = f"model.teacher={os.path.join(ROOT, 'assets', 'toy_teacher')}"  # _refused runs in tmp_path
    assert _refused(capsys, monkeypatch, tmp_path, *REPORTED, teacher, override).startswith(f"command line: {message}")


@pytest.mark.parametrize("override, message", [
    # below 1 diffusers runs no CFG: `adm-megatron sample` refused the CFG such a run recorded
    ("distill.guidance_scale=[0.5, 0.9]", "distill.guidance_scale=[0.5, 0.9]: expected 1 <= low <= high (1: no CFG)"),
    ("distill.guidance_scale=[7, 5]", "distill.guidance_scale=[7.0, 5.0]: expected 1 <= low <= high (1: no CFG)"),
    ("parallel.timeout_s=1e-300", "parallel.timeout_s=1e-300: expected seconds in [1, 31536000] (a year)"),  # gloo's
    # traceback at once; and past timedelta's range an OverflowError once the process group was made
    ("parallel.timeout_s=1e14", "parallel.timeout_s=100000000000000.0: expected seconds in [1, 31536000] (a year)"),
    # each weight named with its value, and where it was set (the default of the other was blamed)
    ("distill.cls_weight=-1", "distill.cls_weight=-1.0: expected >= 0"),
    ("distill.pixel_weight=-1", "distill.pixel_weight=-1.0: expected >= 0"),
    ("distill.pixel_layers=[2, 2]", "distill.pixel_layers=[2, 2]: a layer given twice (one head per layer)"),
    ('output_dir=""', "output_dir is empty: expected a directory path"),  # said "'' exists and is not a directory"
    # TE's delayed-scaling knobs: checked with a TE recipe only, so nonsense passed without one
    ("model.fp8_amax_history_len=0", "model.fp8_amax_history_len=0: expected >= 1"),
    ("model.fp8_margin=-1", "model.fp8_margin=-1: expected >= 0"),
])
def test_ranges_refused_as_read(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.teacher=x", override])
    assert str(err.value) == f"command line: {message}"
    load_config(None, ["model.teacher=x", "distill.guidance_scale=[1, 1]", "parallel.timeout_s=1"])


def test_a_saved_run_below_the_newer_cfg_floor_is_read_back():
    """A checkpoint's config (export, resume) is read as it was trained: the CFG floor of 1 is a
    new run's."""
    from adm_megatron.config import config_from_dict

    config = config_from_dict({"model": {"teacher": "x"}, "distill": {"guidance_scale": [0.5, 1.0]}}, "checkpoint")
    assert config.distill.guidance_scale == (0.5, 1.0)


def test_a_files_or_a_saved_configs_nan_is_refused_naming_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  teacher: x\noptim:\n  fake_score:\n    grad_clip: .nan\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(config), ["train.max_iterations=1"])
    assert str(err.value) == f"{config}: optim.fake_score.grad_clip=.nan: expected a finite number"
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"teacher": "x"}, "distill": {"guidance_scale": [float("inf"), 7.0]}}, "checkpoint")
    assert str(err.value) == "checkpoint: distill.guidance_scale[0]=inf: expected a finite number"


@pytest.mark.parametrize("override, message", [
    ("distill.head_hidden=0", "distill.head_hidden=0: must be >= 1"),
    ("distill.head_hidden=-8", "distill.head_hidden=-8: must be >= 1"),
    ("distill.head_blocks=0", "distill.head_blocks=0: must be >= 1"),
    ("distill.head_blocks=-1", "distill.head_blocks=-1: must be >= 1"),
    ("optim.generator.betas=[0.9, 1]", "optim.generator.betas=[0.9, 1.0]: expected each in [0, 1)"),
    ("optim.discriminator.betas=[-0.1, 0.99]", "optim.discriminator.betas=[-0.1, 0.99]: expected each in [0, 1)"),
    ("optim.fake_score.weight_decay=-0.01", "optim.fake_score.weight_decay=-0.01: must be >= 0"),
    ("optim.generator.grad_clip=-1", "optim.generator.grad_clip=-1.0: must be >= 0"),
    ("optim.discriminator.lr=0", "optim.discriminator.lr=0.0: must be > 0"),
    ("seed=99999999999999999999", "seed=99999999999999999999: expected an integer in [0, 2**63 - 1]"),
    ("seed=-1", "seed=-1: expected an integer in [0, 2**63 - 1]"),
])
def test_settings_that_failed_after_building_are_refused_first(override, message, capsys, monkeypatch, tmp_path):
    """Each crashed with a traceback once the networks were built (the seed: ``Overflow when
    unpacking long long``)."""
    assert _refused(capsys, monkeypatch, tmp_path, *REPORTED, override) == f"command line: {message}"


def test_the_largest_seed_torch_takes_is_accepted():
    import torch

    seed = load_config(None, ["model.teacher=x", f"seed={2**63 - 1}"]).seed
    torch.Generator().manual_seed(seed + 2718 + 100)  # megatron's tensor-parallel offset, a sample's index


def test_a_key_overridden_twice_takes_the_last_as_print_config_shows(capsys, monkeypatch, tmp_path):
    """As Hydra and OmegaConf do; ``--print-config`` shows the value the run would use."""
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main(["train", *REPORTED, "distill.generator_steps=2", "distill.generator_steps=7", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["distill"]["generator_steps"] == 7
    assert os.listdir(tmp_path) == []


def test_a_check_made_after_loading_names_where_its_key_was_set(cogvideox_pipeline, capsys, monkeypatch, tmp_path):
    """Checks the trainer makes once it reads the teacher (adm_megatron/train/validate.py) name the
    YAML file, the command line or the default as the source, as the checks made while loading do."""
    run = tmp_path / "run.yaml"
    run.write_text("model: {teacher: nowhere}\n")
    assert _refused(capsys, monkeypatch, tmp_path, "--config", str(run)) == (
        f"{run}: model.teacher='nowhere': directory not found (relative to the working directory {tmp_path})")
    assert _refused(capsys, monkeypatch, tmp_path, "--config", str(run), "model.teacher=elsewhere").startswith(
        "command line: model.teacher='elsewhere': directory not found")
    run.write_text(f"model: {{teacher: {cogvideox_pipeline}}}\n")  # fewer blocks than the default asks
    assert _refused(capsys, monkeypatch, tmp_path, "--config", str(run)).startswith(
        f"default (not set in {run}): distill.head_every=3: the teacher has only ")
