"""key=value overrides (train.config) and the shared command line (train.cli) of the training scripts."""
import importlib.util
from pathlib import Path

import pytest

from petl_vision.train.cli import parse_training_args, training_parser
from petl_vision.train.config import (ConfigError, OptimConfig, apply_override, apply_section_override, build_section, format_override,
                                      load_config, parse_override)
from petl_vision.train.diffusion import load_diffusion_config
from petl_vision.train.erase import load_erase_config

ROOT = Path(__file__).resolve().parents[1]


def script_parse_args(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


@pytest.mark.parametrize("item, path, value", [
    ("epochs=3", ["epochs"], 3),
    ("optim.lr=0.01", ["optim", "lr"], 0.01),
    ("a.b.c=1.0e-3", ["a", "b", "c"], 0.001),
    ("optim.lr=1e-3", ["optim", "lr"], 0.001),  # YAML 1.1 (PyYAML) reads a string; load_yaml reads floats as YAML 1.2
    ("method.threshold=5E+2", ["method", "threshold"], 500.0),
    ("x=-2.5e-3", ["x"], -0.0025),
    ("x=.5", ["x"], 0.5),
    ("x=1e", ["x"], "1e"),
    ("x=e3", ["x"], "e3"),
    ("data.augment=true", ["data", "augment"], True),
    ("data.augment=no", ["data", "augment"], False),
    ("optim.betas=[0.9, 0.99]", ["optim", "betas"], [0.9, 0.99]),
    ("model_kwargs={img_size: 32}", ["model_kwargs"], {"img_size": 32}),
    ("clip_grad_norm=null", ["clip_grad_norm"], None),
    ("clip_grad_norm=", ["clip_grad_norm"], None),
    ("model=vit_small", ["model"], "vit_small"),
    ("surrogate='a dog'", ["surrogate"], "a dog"),
    ("concept='yes'", ["concept"], "yes"),
    ("validation_prompt=x = y", ["validation_prompt"], "x = y"),  # split at the first '='
    (" method . name = vpt", ["method", "name"], "vpt"),
])
def test_parse_override(item, path, value):
    got_path, got = parse_override(item)
    assert got_path == path and got == value and type(got) is type(value)


def test_parse_override_empty_value():
    assert parse_override("surrogate=", empty="") == (["surrogate"], "")
    assert parse_override("surrogate=''", empty=None) == (["surrogate"], "")


@pytest.mark.parametrize("item", ["epochs", "=3", "optim..lr=1", "optim.=1", "optim.betas=[0.9,"])
def test_bad_override_names_it_and_the_accepted_form(item):
    with pytest.raises(ConfigError) as e:
        parse_override(item)
    assert f"override {item!r}" in str(e.value) and "key=value" in str(e.value)


@pytest.mark.parametrize("value", ["o", "runs/x", "yes", "", " padded ", "a: b", "1.0", "it's", "#x", "null", "a\nb",
                                   3, 1e-5, -2.5, True, None, [1, "a"], {"r": 8}])
def test_format_override_round_trips(value):
    text = format_override("k", value)
    assert parse_override(text, empty=object()) == (["k"], value)


def test_format_override_quotes_only_when_needed():
    assert [format_override("output_dir", "runs/x"), format_override("concept", "yes"), format_override("max_steps", 3)] == [
        "output_dir=runs/x", "concept='yes'", "max_steps=3"]


def test_train_config_overrides():
    raw = apply_override({"optim": {"lr": 0.1, "name": "sgd"}}, "optim.lr=0.5")
    assert raw == {"optim": {"lr": 0.5, "name": "sgd"}}
    assert apply_override({}, "method=vpt") == {"method": {"name": "vpt"}}
    assert apply_override({}, "model_kwargs.img_size=32") == {"model_kwargs": {"img_size": 32}}
    cfg = load_config(None, ["optim.betas=[0.8, 0.9]", "clip_grad_norm=null", "data.augment=true", "method.name=vpt",
                             "method.num_prompts=5", "epochs=2.0"])
    assert (cfg.optim.betas, cfg.clip_grad_norm, cfg.data.augment, cfg.epochs) == ([0.8, 0.9], None, True, 2)
    assert cfg.method.name == "vpt" and cfg.method.overrides == {"num_prompts": 5}


@pytest.mark.parametrize("item, message", [
    ("optim.lr=fast", r"override 'optim\.lr=fast': optim\.lr must be float, got 'fast'"),
    ("epochs=2.5", r"override 'epochs=2\.5': epochs must be int"),
    ("merge=1", r"override 'merge=1': merge must be bool"),
    ("epoch=3", r"override 'epoch=3': unknown key 'epoch'; valid keys: model, .*epochs"),
    ("optim.lr.x=1", r"override 'optim\.lr\.x=1': 'optim\.lr' is not a section"),
])
def test_train_config_bad_overrides(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [item])


def test_build_section_coerces_and_names_the_key():
    optim = build_section(OptimConfig, {"lr": "1e-3", "betas": [0.8, 0.9]}, "c.yaml", "optim.")
    assert (optim.lr, optim.betas, optim.name) == (1e-3, [0.8, 0.9], "adamw")
    for values, message in [({"lr": "fast"}, r"c\.yaml: optim\.lr must be float, got 'fast'"),
                            ({"lrate": 1}, r"c\.yaml: unknown key\(s\) \['optim\.lrate'\]; valid: \['optim\.betas'"),
                            ("adamw", r"c\.yaml: 'optim' must be a mapping, got 'adamw'")]:
        with pytest.raises(ConfigError, match=message):
            build_section(OptimConfig, values, "c.yaml", "optim.")


def test_section_overrides_of_a_trainer_with_its_own_sections():
    sections = {"opt": OptimConfig}
    raw = apply_section_override({"opt": {"name": "sgd"}}, "opt.lr=0.5", sections)
    raw = apply_section_override(raw, "epochs=2", sections)  # not a section of its own: a TrainConfig key
    assert raw == {"opt": {"name": "sgd", "lr": 0.5}, "epochs": 2}
    for item, message in [("opt.lr=fast", r"override 'opt\.lr=fast': opt\.lr must be float"),
                          ("opt.lrate=1", r"override 'opt\.lrate=1': unknown key\(s\) \['opt\.lrate'\]"),
                          ("opt.lr.x=1", r"override 'opt\.lr\.x=1': 'opt\.lr' is not a section"),
                          ("epoch=3", r"override 'epoch=3': unknown key 'epoch'"),
                          ("opt.lr", r"override 'opt\.lr': expected key=value")]:
        with pytest.raises(ConfigError, match=message):
            apply_section_override({}, item, sections)


def test_diffusion_overrides():
    cfg = load_diffusion_config(None, ["method=lora", "method.r=8", "adam_betas=[0.8, 0.9]", "validation_prompt=null",
                                       "lr=1.0e-4", "caption_prefix='Barbie style, '"])
    assert cfg.method.name == "lora" and cfg.method.overrides == {"r": 8}
    assert (cfg.adam_betas, cfg.validation_prompt, cfg.lr, cfg.caption_prefix) == ([0.8, 0.9], None, 1e-4, "Barbie style, ")
    for item, message in [("steps=3", r"override 'steps=3': unknown key 'steps'; valid keys: model, data"),
                          ("lr.x=1", r"override 'lr\.x=1': 'lr' has no sub-keys \(only method\.<field> take"),
                          ("max_steps=many", r"override 'max_steps=many': max_steps must be int"),
                          ("max_steps", r"override 'max_steps': expected key=value")]:
        with pytest.raises(ConfigError, match=message):
            load_diffusion_config(None, [item])


def test_erase_overrides():
    cfg = load_erase_config(None, ["concept=1984", "surrogate=", "positive='a dog'", "latent_anchoring=false", "lr=3.0e-4"])
    assert (cfg.concept, cfg.surrogate, cfg.positive, cfg.latent_anchoring, cfg.lr) == ("1984", "", "a dog", False, 3e-4)
    for item, message in [("steps=3", r"override 'steps=3': unknown key 'steps'; valid keys: model, concept"),
                          ("positive.x=1", r"override 'positive\.x=1': 'positive' has no sub-keys \(no key takes"),
                          ("rank=1.5", r"override 'rank=1\.5': rank must be int"),
                          ("concept=[a,", r"override 'concept=\[a,': the value is not valid YAML")]:
        with pytest.raises(ConfigError, match=message):
            load_erase_config(None, ["concept=x", item])


def test_training_parser_interleaves_options_and_overrides():
    parser = training_parser("test", "config")
    args, overrides = parse_training_args(parser, ["--config", "c.yaml", "a=1", "--merge", "b=2", "--output-dir", "runs/x y"])
    assert args.config == "c.yaml" and args.resume is None
    assert overrides == ["a=1", "b=2", "merge=true", "output_dir=runs/x y"]  # the flags come last: they win
    with pytest.raises(SystemExit):
        parse_training_args(parser, ["a=1"])  # --config is required here


def test_finetune_diffusion_command_line():
    parse_args = script_parse_args("finetune_diffusion")
    args, overrides = parse_args(["--model", "pipe", "--data", "imgs", "--config", "c.yaml", "--method", "lora", "--output-dir", "o",
                                  "--max-steps", "3", "--mixed-precision", "fp16", "--no-progress", "--resume", "method.r=8", "lr=0.01"])
    assert args.config == "c.yaml" and args.resume is True
    assert overrides == ["model=pipe", "data=imgs", "method=lora", "max_steps=3", "mixed_precision=fp16", "progress=false",
                         "output_dir=o", "method.r=8", "lr=0.01"]  # the flags come first: trailing overrides win
    args, overrides = parse_args(["max_steps=5", "--resume", "runs/c/checkpoints/step_2", "--max-steps", "3", "seed=1"])
    assert args.config is None and args.resume == "runs/c/checkpoints/step_2"
    assert overrides == ["max_steps=3", "max_steps=5", "seed=1"]
    assert load_diffusion_config(None, overrides).max_steps == 5
    assert parse_args([])[1] == [] and parse_args(["--resume"])[0].resume is True
    for bad in (["--method", "vpt"], ["--merge"], ["--concept", "x"], ["--max-steps", "many"], ["--mixed-precision", "fp8"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_erase_concept_command_line():
    parse_args = script_parse_args("erase_concept")
    args, overrides = parse_args(["--model", "pipe", "--concept", "van gogh: starry", "--config", "spm.yaml", "--output-dir", "o",
                                  "--max-steps", "4", "--mixed-precision", "bf16", "--no-progress", "--resume", "lr=1.0e-4", "anchors=2"])
    assert args.config == "spm.yaml" and args.resume is True
    assert overrides == ["model=pipe", "concept='van gogh: starry'", "max_steps=4", "mixed_precision=bf16", "progress=false",
                         "output_dir=o", "lr=1.0e-4", "anchors=2"]
    cfg = load_erase_config(None, overrides)
    assert (cfg.concept, cfg.max_steps, cfg.lr, cfg.anchors, cfg.progress) == ("van gogh: starry", 4, 1e-4, 2, False)
    for concept in ("yes", "1.0", "null", "it's"):  # --concept is always read back as the same string
        assert load_erase_config(None, parse_args(["--concept", concept])[1]).concept == concept
    args, overrides = parse_args(["--concept", "snoopy", "--resume", "runs/s", "x=1"])
    assert args.resume == "runs/s" and overrides == ["concept=snoopy", "x=1"]
    for bad in (["--data", "d"], ["--method", "lora"], ["--merge"], ["--max-steps", "1.5"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.parametrize("value", ["1e3", "1.0e-3", "-2E+5", ".5e1"])
def test_strings_that_read_as_floats_stay_strings(value):
    text = format_override("concept", value)
    assert text == f"concept='{value}'" and parse_override(text) == (["concept"], value)


def test_floats_in_exponent_form_everywhere(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optim: {lr: 1e-3, betas: [9e-1, 0.99]}\nmethod: {name: lora, r: 4, alpha: 8e0}\nsched: {min_lr: 1E-6}\n")
    cfg = load_config(config, ["optim.weight_decay=5e-5"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.sched.min_lr, cfg.optim.weight_decay) == (1e-3, [0.9, 0.99], 1e-6, 5e-5)
    assert cfg.method.overrides == {"r": 4, "alpha": 8.0}
    diffusion = load_diffusion_config(None, ["method.threshold=1e-3", "lr=2e-4", "adam_eps=1e-8"])
    assert (diffusion.method.overrides["threshold"], diffusion.lr, diffusion.adam_eps) == (1e-3, 2e-4, 1e-8)
    assert load_erase_config(None, ["concept=x", "lr=3e-4"]).lr == 3e-4


@pytest.mark.parametrize("loader, item, message", [
    (load_config, "optim.lr=0", r"optim\.lr must be a finite number > 0, got 0\.0"),
    (load_config, "optim.lr=inf", r"optim\.lr must be a finite number > 0, got inf"),
    (load_config, "optim.momentum=1", r"optim\.momentum must be a number in \[0, 1\), got 1\.0"),
    (load_config, "optim.weight_decay=-1", r"optim\.weight_decay must be a finite number >= 0"),
    (load_config, "optim.betas=[0.9, 0.999, 0.9]", r"optim\.betas must be a list of two numbers"),
    (load_config, "optim.betas=[0.9, x]", r"optim\.betas\[1\] must be float, got 'x'"),
    (load_config, "label_smoothing=-0.1", r"label_smoothing must be a number in \[0, 1\]"),
    (load_config, "clip_grad_norm=0", r"clip_grad_norm must be a finite number > 0"),
    (load_config, "sched.warmup_epochs=-1", r"sched\.warmup_epochs must be a finite number >= 0"),
    (load_config, "data.test_fraction=1", r"data\.test_fraction must be a number in \(0, 1\)"),
    (load_config, "mixed_precision=fp8", r"mixed_precision must be one of no, fp16, bf16, got 'fp8'"),
    (load_config, "optim.name=adam", r"optim\.name must be one of adamw, sgd, got 'adam'"),
    (load_config, "sched.name=linear", r"sched\.name must be one of cosine, constant"),
    (load_diffusion_config, "lr=-1e-4", r"override 'lr=-1e-4': lr must be a finite number > 0"),
    (load_diffusion_config, "adam_betas=[0.9, 1.0]", r"adam_betas must be a number in \[0, 1\) each"),
    (load_diffusion_config, "max_grad_norm=-1", r"max_grad_norm must be a finite number >= 0"),
    (lambda path, items: load_erase_config(path, ["concept=x", *items]), "lr=nan", r"lr must be a finite number > 0, got nan"),
])
def test_values_are_range_checked_at_load_time(loader, item, message):
    with pytest.raises(ConfigError, match=message) as err:
        loader(None, [item])
    assert str(err.value).startswith(f"override {item!r}: ")  # named where the user wrote it


def test_config_files_that_are_not_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: 0.1\n lr: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML \(.* at line 3, column 2\)"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not a text file \(byte 0 is not UTF-8\)"):
        load_config(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match=r"config file is a directory: .* \(expected a YAML file"):
        load_config(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir .*file is a file; expected a folder"):
        load_config(None, [f"output_dir={tmp_path / 'file'}"])


def test_overwrite_reaches_trainers_that_take_it():
    from petl_vision.train.cli import trainer_options

    args, _ = parse_training_args(training_parser("t", "c"), ["--config", "c.yaml", "--overwrite", "--resume"])
    assert args.overwrite is True and args.debug is False

    def new_trainer(cfg, resume=None, overwrite=False):
        pass

    def old_trainer(cfg, resume=None):
        pass

    assert trainer_options(new_trainer, args) == {"resume": True, "overwrite": True}
    assert trainer_options(old_trainer, args) == {"resume": True}
    args, _ = parse_training_args(training_parser("t", "c"), ["--config", "c.yaml"])
    assert trainer_options(new_trainer, args) == {"resume": None}
