"""Model directories and orbax training checkpoints: round trips, and damaged files that must not lose data."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ulmfit_jax import checkpoint, models
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config


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
    assert checkpoint.TrainingCheckpointer(tmp_path / "new").restore(tree(0)) == (None, None)


def test_restore_takes_the_target_tree_itself(tmp_path):
    saved_checkpointer(tmp_path, [1, 2])
    corrupt(tmp_path / "2")
    step, restored = checkpoint.TrainingCheckpointer(tmp_path).restore(tree(0))
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, restored, tree(1))


def test_only_process_0_prints_warnings(tmp_path, capsys, monkeypatch):
    saved_checkpointer(tmp_path, [1, 2])
    corrupt(tmp_path / "2")
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert checkpoint.TrainingCheckpointer(tmp_path).restore(tree(0))[0] == 1
    assert "unreadable" not in capsys.readouterr().out


# Two JAX processes on this machine (jax.distributed over localhost, two CPU devices each), run as
# the training scripts run under several processes: every process saves and restores together.
# Process 1 is made to fail reading the newest step alone, which would leave it on an older step
# than process 0; `restore` must then fail on both, not train on from different states.
TWO_PROCESS_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    import numpy as np
    process, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec
    from ulmfit_jax import checkpoint

    mesh = jax.make_mesh((4,), ("data",))
    replicated, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))

    def tree(value):
        weight = np.full((3, 2), value, np.float32)
        carry = np.arange(8, dtype=np.float32) + value
        return {"params": {"w": jax.make_array_from_callback((3, 2), replicated, lambda i: weight[i])},
                "carry": jax.make_array_from_callback((8,), sharded, lambda i: carry[i]), "step": int(value)}

    def gathered(restored):
        return {"w": np.asarray(multihost_utils.process_allgather(restored["params"]["w"], tiled=True)),
                "carry": np.asarray(multihost_utils.process_allgather(restored["carry"], tiled=True)),
                "step": restored["step"]}

    def check(restored, value):
        assert restored["carry"].sharding == sharded, restored["carry"].sharding
        expected = {"w": np.full((3, 2), value, np.float32), "carry": np.arange(8, dtype=np.float32) + value,
                    "step": value}
        jax.tree.map(np.testing.assert_array_equal, gathered(restored), expected)

    saver = checkpoint.TrainingCheckpointer(folder, max_to_keep=5)
    for step in (1, 2, 3):
        saver.save(step, tree(step))
    step, restored = checkpoint.TrainingCheckpointer(folder).restore(tree(0))
    assert step == 3
    check(restored, 3)
    step, restored = checkpoint.TrainingCheckpointer(folder).restore(lambda s: tree(0))
    assert step == 3

    multihost_utils.sync_global_devices("corrupt")
    if process == 0:
        from pathlib import Path
        for path in (Path(folder) / "3").rglob("*"):
            if path.is_file():
                path.write_bytes(b"garbage")
    multihost_utils.sync_global_devices("corrupted")
    step, restored = checkpoint.TrainingCheckpointer(folder).restore(tree(0))
    assert step == 2
    check(restored, 2)

    diverging = checkpoint.TrainingCheckpointer(folder)
    if process == 1:
        restore = diverging.manager.restore
        def fail_on_step_2(step, **kwargs):
            if step == 2:
                raise OSError("unreadable here only")
            return restore(step, **kwargs)
        diverging.manager.restore = fail_on_step_2
    try:
        diverging.restore(tree(0))
        raise AssertionError("different steps were restored without an error")
    except RuntimeError as error:
        assert "process 0: step 2, process 1: step 1" in str(error), error
    print(f"process {process} done", flush=True)
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_two_processes_save_and_restore_together(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(TWO_PROCESS_WORKER)
    port, folder = str(free_port()), str(tmp_path / "checkpoints")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    processes = [subprocess.Popen([sys.executable, str(worker), str(i), port, folder], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for i, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0 and f"process {i} done" in output, output[-5000:]
    # the warning about the corrupt step comes once, from process 0
    assert "checkpoint step 3" in outputs[0] and "checkpoint step 3" not in outputs[1]


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
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():  # the permissions of any new file, not the temporary file's owner-only
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
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


def test_an_empty_subtree_survives_a_round_trip(tmp_path):
    """A tied language model without an output bias has `{"decoder": {}}`, which has no leaves."""
    config = awd_lstm_lm_config(12, emb_size=4, n_hidden=6, n_layers=2, tie_weights=True, out_bias=False)
    params = jax.tree.map(np.asarray, models.init_language_model(jax.random.PRNGKey(0), config))
    assert params["decoder"] == {}
    checkpoint.save_model(tmp_path / "lm", config, params, [f"t{i}" for i in range(12)])
    loaded = checkpoint.load_model(tmp_path / "lm")["params"]
    assert loaded["decoder"] == {}
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("tree_", [
    {}, [], {"a": {}, "b": [], "c": [{}, {"d": np.ones(2)}, []], "e": {"f": {"g": []}}, "h": np.zeros(0)},
    [np.arange(3), {}, [[]]],
])
def test_flatten_and_unflatten_keep_empty_containers(tree_):
    restored = checkpoint.unflatten_tree(checkpoint.flatten_tree(tree_))
    assert jax.tree.structure(restored) == jax.tree.structure(tree_)
    jax.tree.map(np.testing.assert_array_equal, restored, tree_)


def test_a_tree_without_empty_containers_keeps_the_old_keys():
    """Files written before the empty-container markers load as before, and those written now
    without empty containers hold exactly the keys they always did."""
    flat = checkpoint.flatten_tree({"encoder": {"rnn": [{"w": np.ones(2)}]}, "decoder": {"bias": np.zeros(3)}})
    assert sorted(flat) == ["decoder/bias", "encoder/rnn/0/w"]


@pytest.mark.parametrize("key", ["a/b", "__empty_dict__", "__empty_list__"])
def test_an_ambiguous_key_is_refused(key):
    with pytest.raises(ValueError, match="cannot store the tree key"):
        checkpoint.flatten_tree({"x": {key: np.ones(1)}})


# ----------------------------------------------------------------------------------------------
# Every parameter layout through a model directory, and the tokenizer beside the vocabulary

def _randomized(tree_, seed):
    """Every leaf replaced by random values of its shape and dtype: a round trip that mixed up two
    leaves of one shape, or lost a batch-norm statistic to its initial zeros and ones, shows."""
    leaves, structure = jax.tree.flatten(tree_)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(structure, [rng.standard_normal(np.shape(x)).astype(np.asarray(x).dtype)
                                          for x in leaves])


LM_LAYOUTS = [(arch, tied, bias) for arch in ("lstm", "qrnn") for tied in (True, False) for bias in (True, False)]


@pytest.mark.parametrize("arch,tied,bias", LM_LAYOUTS, ids=[f"{a}-{'tied' if t else 'untied'}-{'bias' if b else 'nobias'}"
                                                            for a, t, b in LM_LAYOUTS])
def test_every_language_model_layout_round_trips(tmp_path, arch, tied, bias):
    from ulmfit_jax.config import awd_qrnn_lm_config
    make = awd_lstm_lm_config if arch == "lstm" else awd_qrnn_lm_config
    config = make(12, emb_size=4, n_hidden=6, n_layers=2, tie_weights=tied, out_bias=bias)
    params = _randomized(jax.tree.map(np.asarray, models.init_language_model(jax.random.PRNGKey(0), config)), 1)
    assert ("weight" in params["decoder"]) != tied and ("bias" in params["decoder"]) == bias
    checkpoint.save_model(tmp_path / "lm", config, params, [f"t{i}" for i in range(12)])
    model = checkpoint.load_model(tmp_path / "lm")
    assert model["config"] == config and model["tokenizer"] is None
    assert jax.tree.structure(model["params"]) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, model["params"], params)
    encoder_config, encoder_params, _ = checkpoint.load_encoder(tmp_path / "lm")
    assert encoder_config == config.encoder
    jax.tree.map(np.testing.assert_array_equal, encoder_params, params["encoder"])


@pytest.mark.parametrize("arch", ["lstm", "qrnn"])
def test_every_classifier_layout_round_trips_with_its_batch_norm_statistics(tmp_path, arch):
    from ulmfit_jax.config import awd_qrnn_clas_config
    make = awd_lstm_clas_config if arch == "lstm" else awd_qrnn_clas_config
    config = make(12, 3, emb_size=4, n_hidden=6, n_layers=2, bptt=5)
    params, batch_stats = jax.tree.map(np.asarray, models.init_classifier(jax.random.PRNGKey(0), config))
    params, batch_stats = _randomized(params, 2), _randomized(batch_stats, 3)
    assert jax.tree.leaves(batch_stats)
    checkpoint.save_model(tmp_path / "clas", config, params, [f"t{i}" for i in range(12)], batch_stats=batch_stats,
                          classes=["a", "b", "c"])
    model = checkpoint.load_model(tmp_path / "clas")
    assert model["config"] == config and model["classes"] == ["a", "b", "c"]
    for loaded, saved in ((model["params"], params), (model["batch_stats"], batch_stats)):
        assert jax.tree.structure(loaded) == jax.tree.structure(saved)
        jax.tree.map(np.testing.assert_array_equal, loaded, saved)
    encoder_config, encoder_params, _ = checkpoint.load_encoder(tmp_path / "clas")
    assert encoder_config == config.encoder
    jax.tree.map(np.testing.assert_array_equal, encoder_params, params["encoder"])


@pytest.fixture
def sentencepiece_model(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from ulmfit_jax.text.tokenizers import train_sentencepiece
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(300)]
    texts = ["xxbos " + " ".join(rng.choice(words, size=12)) for _ in range(200)]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm") / "spm"))


def test_the_tokenizer_is_kept_beside_the_vocabulary(tmp_path, sentencepiece_model):
    from ulmfit_jax.text.tokenizers import TokenizerSettings
    config = awd_lstm_lm_config(12, emb_size=4, n_hidden=6, n_layers=1)
    params = jax.tree.map(np.asarray, models.init_language_model(jax.random.PRNGKey(0), config))
    vocab = [f"t{i}" for i in range(12)]
    spm = TokenizerSettings(kind="sentencepiece", sentencepiece_model=sentencepiece_model, add_eos=True)
    checkpoint.save_model(tmp_path / "lm", config, params, vocab, tokenizer=spm)
    assert (tmp_path / "lm" / "spm.model").read_bytes() == open(sentencepiece_model, "rb").read()
    record = json.loads((tmp_path / "lm" / "tokenizer.json").read_text())
    assert record["kind"] == "sentencepiece" and record["sentencepiece_model"] == "spm.model" and record["add_eos"]
    loaded = checkpoint.load_model(tmp_path / "lm")["tokenizer"]
    assert loaded == dataclasses.replace(spm, sentencepiece_model=str(tmp_path / "lm" / "spm.model"))
    assert checkpoint.same_tokenizer(loaded, spm) and not checkpoint.same_tokenizer(loaded, TokenizerSettings())
    # the directory stands alone: the model it was copied from may go
    os.remove(sentencepiece_model)
    assert checkpoint.load_tokenizer(tmp_path / "lm") == loaded

    # saved over with another tokenizer, or with none: nothing stale is left behind
    fast = TokenizerSettings(post_rules=())
    checkpoint.save_model(tmp_path / "lm", config, params, vocab, tokenizer=fast)
    assert not (tmp_path / "lm" / "spm.model").exists() and checkpoint.read_tokenizer(tmp_path / "lm") == fast
    checkpoint.save_model(tmp_path / "lm", config, params, vocab)
    assert checkpoint.read_tokenizer(tmp_path / "lm") is None


@pytest.mark.parametrize("record,error,message", [
    ({"kind": "bpe"}, ValueError, "tokenizer kind must be one of"),
    ({"kind": "fast", "pre_rules": ["no_such_rule"]}, ValueError, "unknown rule names"),
    ({"kind": "fast", "pre_rules": "lowercase"}, ValueError, "must be a list of rule names"),
    ({"kind": "fast", "lowercase": True}, ValueError, "unknown tokenizer settings"),
    ({"kind": "sentencepiece", "sentencepiece_model": "spm.model"}, FileNotFoundError, "spm.model, which is missing"),
    ({"kind": "sentencepiece", "sentencepiece_model": "../elsewhere/spm.model"}, ValueError, "a file name in"),
    (["fast"], ValueError, "must be a JSON object"),
])
def test_a_bad_tokenizer_record_is_a_clear_error(classifier_model, record, error, message):
    directory = classifier_model[0]
    (directory / "tokenizer.json").write_text(json.dumps(record))
    with pytest.raises(error, match=message) as raised:
        checkpoint.load_model(directory)
    assert "tokenizer.json" in str(raised.value)
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not valid JSON"):
        checkpoint.load_model(directory)


def test_an_older_directory_loads_the_default_tokenizer_with_a_one_line_warning(classifier_model, capsys):
    from ulmfit_jax.text.tokenizers import TokenizerSettings
    directory = classifier_model[0]
    assert checkpoint.load_model(directory)["tokenizer"] is None
    assert capsys.readouterr().err == ""                     # loading the parameters alone says nothing
    assert checkpoint.load_tokenizer(directory) == TokenizerSettings()
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "records no tokenizer" in warning and str(directory) in warning
