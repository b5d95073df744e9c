"""Data parallelism (mesagen.runtime.parallel): the batch sharded over 4 virtual CPU devices gives the 1-device
losses to float32 round-off over 20 steps, the run folder records devices and mesh, and checkpoints resume
across layouts. JAX reads the device count at start-up, so the 4-device runs happen in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from mesagen.runtime.parallel import DeviceConfigError, make_mesh
from mesagen.runtime.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
FAKE_LINEAR = str(ROOT / "tests" / "fixtures" / "fake_linear_layer.py")
FAKE_RIDGE = str(ROOT / "tests" / "fixtures" / "fake_ridge_layer.py")

SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    import mesagen  # noqa: F401 -- first: the PJRT_NPROC workaround (mesagen/_xla_cpu.py)
    import jax, numpy as np, equinox as eqx
    from mesagen import _xla_cpu
    from mesagen.runtime.config import RunConfig
    from mesagen.runtime.parallel import DeviceConfigError
    from mesagen.runtime.train import Trainer, train, read_metrics

    out = {"n_devices": jax.device_count(), "pjrt_nproc": os.environ.get("PJRT_NPROC"),
           "affected": _xla_cpu.jaxlib_is_affected()}
    def cfg(devices, batch=32, steps=20):
        return RunConfig.model_validate({
            "name": "dp", "task": {"state_dim": 3, "seq_len": 9},
            "model": {"tokens": "constructed", "d_model": 12, "heads": 2, "d_k": 6,
                      "blocks": [sys.argv[1], sys.argv[2]], "clip_activations": 4.0, "init_std": 0.1},
            "train": {"steps": steps, "batch_size": batch, "schedule": {"kind": "warmup_cosine", "peak_lr": 3e-3,
                      "warmup_steps": 3}, "weight_decay": 0.1, "clip_grad_norm": 1.0, "log_every": 5,
                      "eval_every": 10, "checkpoint_every": 100, "progress": False, "devices": devices},
            "eval": {"batch": 64, "tune_batch": 32}})

    def losses(devices):
        tr = Trainer(cfg(devices))
        st = tr.initial_state()
        res = []
        for _ in range(20):
            st, loss = tr.step(st)
            res.append(float(loss))
        leaf = st.model.blocks[0].attn.wq
        return res, tr.evaluate(st.model).tolist(), len(leaf.sharding.device_set), leaf.sharding.is_fully_replicated

    for n in (1, 4):
        out[f"losses_{n}"], out[f"eval_{n}"], out[f"param_devices_{n}"], out[f"replicated_{n}"] = losses(n)
    out["default_mesh"] = Trainer(cfg(None)).layout()["mesh"]
    try:
        Trainer(cfg(4, batch=30))
    except DeviceConfigError as exc:
        out["batch_error"] = str(exc)
    try:
        Trainer(cfg(8))
    except DeviceConfigError as exc:
        out["devices_error"] = str(exc)

    # checkpoints across layouts: 10 steps on 4 devices, resumed on 1 (and the reverse) vs uninterrupted runs
    run = sys.argv[3]
    for first, second in ((4, 1), (1, 4)):
        d = os.path.join(run, f"{first}to{second}")
        train(cfg(first), d, stop_at=10, log=lambda *a: None)
        start = read_metrics(d)[0]
        out[f"start_{first}"] = {k: start[k] for k in ("mesh", "devices", "process_count")}
        final = train(cfg(second), d, resume=True, log=lambda *a: None)
        ref = train(cfg(second), os.path.join(run, f"ref{first}{second}"), log=lambda *a: None)
        diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                 zip(jax.tree.leaves(eqx.filter(final.model, eqx.is_array)),
                     jax.tree.leaves(eqx.filter(ref.model, eqx.is_array)))]
        out[f"resume_{first}to{second}_maxdiff"] = max(diffs)
        out[f"resume_{first}to{second}_loss"] = [r["train_loss"] for r in read_metrics(d) if "train_loss" in r]
        out[f"ref_{first}to{second}_loss"] = [r["train_loss"] for r in read_metrics(os.path.join(run, f"ref{first}{second}")) if "train_loss" in r]
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """Run SCRIPT with 4 virtual CPU devices; returns its JSON result."""
    tmp = tmp_path_factory.mktemp("dp")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu"}
    env.pop("PJRT_NPROC", None)                 # let `import mesagen` apply the workaround itself
    proc = subprocess.run([sys.executable, "-c", SCRIPT, FAKE_LINEAR, FAKE_RIDGE, str(tmp)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_four_devices_match_one_device(four_devices):
    """20 steps of a linear + ridge model: per-step losses on a 4-device mesh equal the 1-device ones to float32
    round-off; parameters are replicated on all 4 devices; the default mesh uses every device."""
    r = four_devices
    assert r["n_devices"] == 4 and r["default_mesh"] == {"data": 4}
    assert r["pjrt_nproc"] == ("1" if r["affected"] else None)     # the jaxlib 0.10 workaround still applies
    assert (r["param_devices_1"], r["param_devices_4"]) == (1, 4) and r["replicated_4"]
    l1, l4 = r["losses_1"], r["losses_4"]
    assert l1[-1] < l1[0]
    for a, b in zip(l1, l4):
        assert abs(a - b) <= 2e-5 * abs(a), (l1, l4)
    for a, b in zip(r["eval_1"], r["eval_4"]):
        assert abs(a - b) <= 1e-4 * abs(a) + 1e-7


def test_layout_errors(four_devices):
    assert "30 sequences do not split evenly over 4 devices" in four_devices["batch_error"]
    assert "8 devices asked for, JAX sees 4" in four_devices["devices_error"]


def test_run_folder_records_mesh_and_checkpoints_cross_layouts(four_devices):
    r = four_devices
    assert r["start_4"]["mesh"] == {"data": 4} and len(r["start_4"]["devices"]) == 4
    assert r["start_1"]["mesh"] == {"data": 1} and r["start_1"]["process_count"] == 1
    for case in ("4to1", "1to4"):
        assert r[f"resume_{case}_maxdiff"] < 1e-5, r[f"resume_{case}_maxdiff"]
        for a, b in zip(r[f"resume_{case}_loss"], r[f"ref_{case}_loss"]):
            assert abs(a - b) <= 2e-5 * abs(a)


def test_single_device_default():
    """In this (1-device) process the default mesh is every device there is, and asking for more is refused."""
    assert make_mesh().shape == {"data": jax.device_count()}
    with pytest.raises(DeviceConfigError, match="xla_force_host_platform_device_count"):
        make_mesh(jax.device_count() + 1)


def test_two_processes_match_one_device(tmp_path):
    """Multi-host on one machine: 2 processes x 2 virtual CPU devices (jax.distributed over localhost, gloo
    collectives) run `mesagen train --coordinator ... --num-processes 2 --process-id I`; process 0 alone writes
    the run folder, whose losses equal a 1-device run's to float32 round-off."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(textwrap.dedent(f"""
        name: mh
        task: {{state_dim: 3, seq_len: 9}}
        model: {{tokens: constructed, d_model: 12, heads: 2, d_k: 6, blocks: [{FAKE_LINEAR}, {FAKE_RIDGE}],
                 clip_activations: 4.0, init_std: 0.1}}
        train: {{steps: 10, batch_size: 32, schedule: {{kind: warmup_cosine, peak_lr: 3.0e-3, warmup_steps: 3}},
                 log_every: 5, eval_every: 10, checkpoint_every: 10, progress: false}}
        eval: {{batch: 64, tune_batch: 32}}
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cmd = [sys.executable, "-m", "mesagen.runtime.cli_train", "train", str(cfg)]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / "mh"), "--coordinator", f"localhost:{port}",
                                     "--num-processes", "2", "--process-id", str(i)],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    env1 = {**env, "XLA_FLAGS": ""}
    subprocess.run(cmd + ["--out", str(tmp_path / "one")], env=env1, cwd=tmp_path, check=True, capture_output=True,
                   timeout=600)
    recs = {r: [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("mh", "one")}
    assert recs["mh"][0]["mesh"] == {"data": 4} and recs["mh"][0]["process_count"] == 2
    assert recs["one"][0]["mesh"] == {"data": 1}
    for key in ("train_loss", "eval_loss"):
        a, b = ([r[key] for r in recs[x] if key in r] for x in ("mh", "one"))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert abs(x - y) <= 2e-5 * abs(y), (key, a, b)
    assert (tmp_path / "mh" / "eval.json").is_file() and (tmp_path / "mh" / "checkpoint.eqx").is_file()
