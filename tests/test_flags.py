"""ulmfit_jax.flags: a frozen dataclass's fields as command-line flags, and back."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from ulmfit_jax import flags
from ulmfit_jax.recipes import DemoSettings


@dataclasses.dataclass(frozen=True)
class Settings:
    words: int = 1000
    learning_rate: float = 2e-2
    name: str = "trec"
    folder: Path = Path("data")
    clip: float | None = None
    shuffle: bool = True
    verbose: bool = False
    seed: int = dataclasses.field(default=0, metadata={"help": "the random seed"})


def parse(cls, argv, **kwargs):
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, cls, **kwargs)
    return parser, parser.parse_args(argv)


def test_defaults_give_the_default_instance():
    _, args = parse(Settings, [])
    assert flags.from_args(Settings, args) == Settings()


def test_every_field_is_a_typed_flag():
    _, args = parse(Settings, ["--words", "7", "--learning-rate", "1e-3", "--name", "sst", "--folder", "/tmp/x",
                               "--clip", "0.4", "--no-shuffle", "--verbose", "--seed", "3"])
    assert flags.from_args(Settings, args) == Settings(words=7, learning_rate=1e-3, name="sst", folder=Path("/tmp/x"),
                                                       clip=0.4, shuffle=False, verbose=True, seed=3)
    assert isinstance(args.words, int) and isinstance(args.learning_rate, float) and isinstance(args.folder, Path)


def test_a_wrong_type_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse(Settings, ["--words", "many"])
    assert "--words" in capsys.readouterr().err


def test_help_names_the_default_and_the_fields_help():
    parser, _ = parse(Settings, [])
    text = parser.format_help()
    assert "--learning-rate FLOAT" in text and "(default 0.02)" in text
    assert "the random seed (default 0)" in text


def test_a_prefix_keeps_two_dataclasses_apart():
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Settings, prefix="lm_")
    flags.add_flags(parser, Settings, prefix="clas_")
    args = parser.parse_args(["--lm-words", "5", "--clas-words", "6", "--no-lm-shuffle"])
    assert flags.from_args(Settings, args, prefix="lm_") == Settings(words=5, shuffle=False)
    assert flags.from_args(Settings, args, prefix="clas_") == Settings(words=6)


def test_a_field_without_default_is_a_required_flag():
    @dataclasses.dataclass(frozen=True)
    class Needs:
        data: Path
        epochs: int = 1

    with pytest.raises(SystemExit):
        parse(Needs, [])
    _, args = parse(Needs, ["--data", "d"])
    assert flags.from_args(Needs, args) == Needs(Path("d"))


def test_an_unsupported_field_type_is_an_error():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        sizes: tuple[int, ...] = (1, 2)

    with pytest.raises(TypeError, match="Odd.sizes"):
        parse(Odd, [])


def test_as_argv_round_trips():
    for settings in (Settings(), Settings(words=3, clip=0.12, shuffle=False, verbose=True, folder=Path("a b")),
                     DemoSettings(classifier_epochs=8, lr_factor=3.0, finetune_lr=7e-4)):
        argv = flags.as_argv(settings)
        _, args = parse(type(settings), argv)
        assert flags.from_args(type(settings), args) == settings
    assert flags.as_argv(Settings()) == []
    assert flags.as_argv(DemoSettings(classifier_epochs=8)) == ["--classifier-epochs", "8"]
    assert flags.as_argv(Settings(shuffle=False), prefix="lm_") == ["--no-lm-shuffle"]


def test_the_demo_settings_are_flags():
    """scripts/demo.py's flags: every DemoSettings field (`--classifier-epochs 8`)."""
    _, args = parse(DemoSettings, ["--classifier-epochs", "8", "--wiki-words", "100000"])
    assert flags.from_args(DemoSettings, args) == DemoSettings(classifier_epochs=8, wiki_words=100000)
