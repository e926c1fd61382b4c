"""Model directories and orbax training checkpoints: round trips, and damaged files that must not lose data."""

import jax
import numpy as np
import pytest

from ulmfit_jax import checkpoint, models
from ulmfit_jax.config import awd_lstm_clas_config


def tree(value):
    return {"params": {"w": np.full((3, 2), value, np.float32), "b": np.arange(4, dtype=np.float32) + value},
            "opt_state": {"count": np.array(value, np.int32)}, "step": int(value)}


def saved_checkpointer(directory, steps):
    manager = checkpoint.TrainingCheckpointer(directory, max_to_keep=5)
    for step in steps:
        manager.save(step, tree(step))
    return manager


def test_restore_gives_the_newest_checkpoint(tmp_path):
    saved_checkpointer(tmp_path, [1, 2])
    step, restored = checkpoint.TrainingCheckpointer(tmp_path).restore(lambda s: tree(0))
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, restored, tree(2))


def corrupt(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    assert files, step_dir
    for path in files:
        path.write_bytes(b"\0garbage")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, capsys):
    saved_checkpointer(tmp_path, [1, 2])
    corrupt(tmp_path / "2")
    step, restored = checkpoint.TrainingCheckpointer(tmp_path).restore(lambda s: tree(0))
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, restored, tree(1))
    warning = capsys.readouterr().out
    assert "checkpoint step 2" in warning and "unreadable" in warning


def test_a_partial_save_is_ignored(tmp_path):
    """orbax writes a step under a temporary name and renames it when complete; a save killed
    half-way leaves only that temporary folder, which is not a checkpoint."""
    saved_checkpointer(tmp_path, [1])
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    partial.mkdir()
    (partial / "half_written").write_bytes(b"\0" * 10)
    manager = checkpoint.TrainingCheckpointer(tmp_path)
    assert manager.latest_step() == 1
    step, restored = manager.restore(lambda s: tree(0))
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, restored, tree(1))


def test_no_readable_checkpoint_is_an_error_naming_each_step(tmp_path):
    saved_checkpointer(tmp_path, [1, 2])
    corrupt(tmp_path / "1")
    corrupt(tmp_path / "2")
    with pytest.raises(RuntimeError, match="no readable checkpoint") as error:
        checkpoint.TrainingCheckpointer(tmp_path).restore(lambda s: tree(0))
    assert "step 2" in str(error.value) and "step 1" in str(error.value)


def test_no_checkpoint_at_all_starts_fresh(tmp_path):
    assert checkpoint.TrainingCheckpointer(tmp_path / "new").restore(lambda s: tree(0)) == (None, None)


@pytest.fixture
def classifier_model(tmp_path):
    config = awd_lstm_clas_config(12, 3, emb_size=4, n_hidden=6, n_layers=2, bptt=5)
    params, batch_stats = models.init_classifier(jax.random.PRNGKey(0), config)
    vocab = [f"t{i}" for i in range(12)]
    checkpoint.save_model(tmp_path / "model", config, jax.tree.map(np.asarray, params), vocab,
                          batch_stats=jax.tree.map(np.asarray, batch_stats), classes=["a", "b", "c"])
    return tmp_path / "model", config, params, batch_stats, vocab


def test_model_directory_round_trip(classifier_model):
    directory, config, params, batch_stats, vocab = classifier_model
    model = checkpoint.load_model(directory)
    assert model["config"] == config and model["vocab"] == vocab and model["classes"] == ["a", "b", "c"]
    jax.tree.map(np.testing.assert_array_equal, model["params"], jax.tree.map(np.asarray, params))
    jax.tree.map(np.testing.assert_array_equal, model["batch_stats"], jax.tree.map(np.asarray, batch_stats))
    encoder_config, encoder_params, encoder_vocab = checkpoint.load_encoder(directory)
    assert encoder_config == config.encoder and encoder_vocab == vocab
    jax.tree.map(np.testing.assert_array_equal, encoder_params, jax.tree.map(np.asarray, params["encoder"]))


def test_truncated_params_are_a_clear_error(classifier_model):
    directory = classifier_model[0]
    data = (directory / "params.npz").read_bytes()
    (directory / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="params.npz is corrupt or partial"):
        checkpoint.load_model(directory)


def test_a_vocabulary_of_another_size_is_refused(classifier_model):
    directory = classifier_model[0]
    (directory / "vocab.json").write_text('["only", "three", "tokens"]')
    with pytest.raises(ValueError, match="vocab.json has 3 tokens, the model 12"):
        checkpoint.load_model(directory)


def test_a_missing_file_is_named(classifier_model):
    directory = classifier_model[0]
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        checkpoint.load_model(directory)


def test_a_failed_save_leaves_the_previous_model_intact(classifier_model, monkeypatch):
    directory, config, params, batch_stats, vocab = classifier_model
    before = (directory / "params.npz").read_bytes()

    def failing_savez(handle, **arrays):
        handle.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_model(directory, config, jax.tree.map(np.asarray, params), vocab)
    assert (directory / "params.npz").read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["classes.json", "config.json", "params.npz", "vocab.json"]
