"""Byte-level language modelling (docs/lm.md): corpus extraction and split, streaming, a short training run with
bits per byte in metrics.jsonl, decoding that matches the full forward, sampling, bad corpora, bfloat16."""

import hashlib
import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesagen.data.text import (ByteCorpus, CorpusError, TextConfig, TextData, icl_score, load_corpus,
                               stdlib_corpus)
from mesagen.runtime.cli_train import main as cli
from mesagen.runtime.config import ConfigError, RunConfig, dump_config
from mesagen.runtime.generate import decode_logits, load_run_model, sample
from mesagen.runtime.model import Model
from mesagen.runtime.train import Trainer


def _corpus_file(path, size=40_000, seed=0):
    """A text-like file: stdlib bytes (the default corpus's start) repeated to ``size`` bytes."""
    data, _ = stdlib_corpus(60_000)
    path.write_bytes((data * (size // len(data) + 1))[:size])
    return path


def _config(corpus, blocks=("softmax", {"layer": "generated:linear", "qk_norm": "l2"}), steps=5, **train_kw):
    return RunConfig.model_validate({
        "name": "lm_tiny",
        "task": {"kind": "text", "seq_len": 16, "corpus": str(corpus), "split_block": 512, "valid_fraction": 0.25},
        "model": {"tokens": "bytes", "tie_embeddings": True, "d_model": 16, "heads": 2, "d_k": 4,
                  "blocks": list(blocks), "layernorm": True, "mlp": True, "mlp_ratio": 2, "init_std": 0.05,
                  "pos_dim": 4},
        "train": {"steps": steps, "batch_size": 4, "schedule": {"kind": "constant", "peak_lr": 3e-3},
                  "log_every": 1, "eval_every": 5, "checkpoint_every": 100, "progress": False, **train_kw},
        "eval": {"batch": 8},
    })


def test_stdlib_corpus_is_deterministic_and_recorded():
    a, rec_a = stdlib_corpus(300_000)
    b, rec_b = stdlib_corpus(300_000)
    assert a == b and rec_a == rec_b
    assert 0 < len(a) <= 300_000 and rec_a["bytes"] == len(a)
    assert rec_a["sha256"] == hashlib.sha256(a).hexdigest()
    assert rec_a["files"] >= 1 and rec_a["python_version"].count(".") == 2
    small, rec_small = stdlib_corpus(100_000)
    assert a.startswith(small) and rec_small["files"] <= rec_a["files"]   # a cap keeps a prefix of whole files


def test_split_is_disjoint_and_deterministic(tmp_path):
    cfg = TextConfig(seq_len=16, corpus=str(_corpus_file(tmp_path / "c.txt")), split_block=512, valid_fraction=0.25)
    d1, d2 = TextData(cfg), TextData(cfg)
    np.testing.assert_array_equal(d1.train_offsets(3, 11, 64), d2.train_offsets(3, 11, 64))
    assert not np.array_equal(d1.train_offsets(3, 11, 64), d1.train_offsets(3, 12, 64))
    np.testing.assert_array_equal(d1.valid_batch(50), d2.valid_batch(50))
    w = cfg.seq_len + 1
    train_bytes = np.zeros(d1.corpus.size, bool)
    for step in range(50):
        for o in d1.train_offsets(0, step, 32):
            train_bytes[o:o + w] = True
    valid_bytes = np.zeros(d1.corpus.size, int)
    for o in d1.valid_offsets(10_000):
        valid_bytes[o:o + w] += 1
    assert valid_bytes.max() == 1                               # validation windows do not overlap
    assert train_bytes.any() and not (train_bytes & (valid_bytes > 0)).any()
    seg = np.arange(d1.corpus.size) // cfg.split_block          # every 4th segment is validation
    assert set(seg[valid_bytes > 0] % 4) == {3} and 3 not in set(seg[train_bytes] % 4)


def test_streaming_reads_across_files(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (700, 1, 0, 2500)]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for name, p in zip(("a.txt", "b.txt", "c.txt", "sub/d.txt"), parts):
        (folder / name).write_bytes(p)
    (folder / ".hidden").write_bytes(b"never read")
    corpus = ByteCorpus.from_path(folder)
    whole = b"".join(parts)
    assert corpus.size == len(whole) and corpus.record["files"] == 3       # the empty file is skipped
    assert all(isinstance(p, np.memmap) for p in corpus._pieces)
    for off, n in ((0, 17), (690, 20), (699, 3), (len(whole) - 17, 17)):
        assert corpus.read(off, n).tobytes() == whole[off:off + n]
    assert corpus.record["sha256"] == hashlib.sha256(whole).hexdigest()
    with pytest.raises(ValueError, match="outside the corpus"):
        corpus.read(len(whole) - 3, 4)


def test_bad_corpus_errors(tmp_path, capsys):
    with pytest.raises(CorpusError, match="no such file or folder"):
        load_corpus(TextConfig(corpus=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no non-empty file"):
        load_corpus(TextConfig(corpus=str(tmp_path / "empty")))
    (tmp_path / "short.txt").write_bytes(b"x" * 100)
    with pytest.raises(CorpusError, match="no validation segment"):
        TextData(TextConfig(seq_len=16, corpus=str(tmp_path / "short.txt"), split_block=512))
    cfg = tmp_path / "lm.yaml"
    dump_config(_config(tmp_path / "short.txt"), cfg)
    assert cli(["train", str(cfg), "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "--text " + str(tmp_path / "nope.txt") + ": no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="--text needs a config with task: {kind: text"):
        RunConfig.model_validate({"task": {"state_dim": 3}, "model": {"tokens": "standard", "blocks": ["softmax"],
                                  "init_std": 0.1}, "train": {"steps": 1, "schedule": {"peak_lr": 1e-3}}}
                                 ).with_overrides(text=str(cfg))
    with pytest.raises(Exception, match="the text task needs tokens: bytes"):
        RunConfig.model_validate({**_config(cfg).model_dump(), "model": {"tokens": "standard", "blocks": ["softmax"],
                                                                          "init_std": 0.1}})


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    corpus = _corpus_file(tmp / "corpus.txt")
    cfg = tmp / "lm.yaml"
    dump_config(_config(tmp / "elsewhere.txt"), cfg)
    run = tmp / "run"
    assert cli(["train", str(cfg), "--text", str(corpus), "--out", str(run)]) == 0
    return run, corpus


def test_training_writes_bits_per_byte(lm_run):
    run, corpus = lm_run
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["corpus"]["path"] == str(corpus.resolve()) and start["corpus"]["bytes"] == corpus.stat().st_size
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    ev = [r for r in records if "eval_bpb" in r]
    assert [r["step"] for r in ev] == [5]
    e = ev[0]
    assert e["eval_bpb"] == pytest.approx(e["eval_loss"] / math.log(2), rel=1e-12)
    assert e["eval_ppl"] == pytest.approx(math.exp(e["eval_loss"]), rel=1e-12)
    assert e["eval_icl"] == pytest.approx(icl_score(np.asarray(e["eval_per_t"])), rel=1e-12)
    assert len(e["eval_per_t"]) == 16 and 0 < e["eval_bpb"] < 8.5      # near-uniform start: log2(256) = 8
    result = json.loads((run / "eval.json").read_text())
    assert result["eval_bpb"] == pytest.approx(e["eval_bpb"], rel=1e-12)
    assert json.loads((run / "corpus.json").read_text())["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    for f in ("per_t.png", "training.png"):
        assert (run / f).stat().st_size > 0
    (run / "eval.json").unlink()
    assert cli(["eval", str(run)]) == 0                                  # mesagen eval of a text run
    assert json.loads((run / "eval.json").read_text())["eval_bpb"] == pytest.approx(e["eval_bpb"], rel=1e-6)


def test_sample_cli(lm_run, capsys):
    run, _ = lm_run
    assert cli(["sample", str(run), "--prompt", "def ", "--tokens", "12", "--seed", "3"]) == 0
    out1 = capsys.readouterr().out
    assert cli(["sample", str(run), "--prompt", "def ", "--tokens", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out == out1 and out1.startswith("def ")
    assert cli(["sample", str(run), "--tokens", "-1"]) == 2
    assert "--tokens must be >= 0" in capsys.readouterr().err
    _, model = load_run_model(run)
    greedy = sample(model, b"ab", 3, temperature=0.0)                 # greedy: the forward's argmax
    assert len(greedy) == 3 and greedy[0] == int(jnp.argmax(model(jnp.asarray([list(b"ab")]))[0, -1]))


@pytest.mark.parametrize("dtype, atol, blocks", [
    (jnp.float64, 1e-10, ("softmax", {"layer": "generated:ridge", "qk_norm": "l2"})),
    (jnp.float32, 2e-5, ("generated:gated_delta", "softmax"))])
def test_decoding_matches_forward(request, dtype, atol, blocks):
    """Logits of the step path (KV cache for softmax, the modules' step for generated layers) equal the full
    forward's at every prefix position: to 1e-10 in float64, 2e-5 in float32 (logits of magnitude ~5)."""
    if dtype == jnp.float64:
        request.getfixturevalue("x64")
    cfg = _config("unused", blocks=blocks)
    model = Model(cfg.model.model_copy(update={"init_std": 0.3}), 256, key=jax.random.PRNGKey(0))
    model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 256)
    full, stepped = model(tokens), decode_logits(model, tokens)
    assert full.dtype == stepped.dtype == dtype
    assert float(jnp.max(jnp.abs(full))) > 1.0
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), rtol=0, atol=atol)


def test_bfloat16_trains(tmp_path):
    cfg = _config(_corpus_file(tmp_path / "c.txt"), blocks=("generated:gated_delta",), steps=3,
                  precision="bfloat16")
    trainer = Trainer(cfg)
    state = trainer.initial_state()
    losses = []
    for _ in range(3):
        state, loss = trainer.step(state)
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array)))
    # the bfloat16 forward is a different computation from float32's (not silently ignored)
    x = jnp.asarray(trainer.eval_tokens[:2])
    assert not np.array_equal(np.asarray(state.model(x, jnp.bfloat16)), np.asarray(state.model(x)))
