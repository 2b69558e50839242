"""The CSMCIR trainer: the jitted step (bank enqueue, one compile, NaN skip, 8-device parity), config errors, and the
cpu_test preset end to end in-process, then killed with SIGKILL mid-run and resumed (subprocesses) to the same
params and bank bit for bit."""

import functools
import json
import os
import signal
import subprocess
import time

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from experiments.configs import csmcir as csmcir_configs
from jax_hd.core import config as config_lib
from jax_hd.core import sharding, train_state
from jax_hd.csmcir import memory_bank as bank_lib
from jax_hd.csmcir import model as model_lib
from jax_hd.csmcir import trainer
from jax_hd.models import qformer

RULES = sharding.DEFAULT_RULES
QF = qformer.QFormerConfig.tiny(
    num_hidden_layers=1,
    cross_attention_frequency=1,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_query_tokens=4,
)
# CLS pooling (K = 1): at init a tiny model's query-token outputs nearly tie, and the max over tokens would route the
# gradient by rounding noise, which differs between device counts.
MODEL = model_lib.CSMCIRConfig.tiny(QF, target_pool="cls")
IMAGE_TOKENS, TEXT_LEN, BATCH = 5, 6, 8
BANK = bank_lib.BankConfig(size=32, entropy_mode="weight")
LOSS = {"aux_rtc": 0.0, "aux_align": 0.0, "symmetric_weight": 0.0, "mask_batch_duplicates": True}


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = lambda: rng.normal(size=(BATCH, IMAGE_TOKENS, QF.encoder_hidden_size)).astype(np.float16)  # noqa: E731
    mask = (np.arange(TEXT_LEN)[None] < rng.integers(2, TEXT_LEN + 1, BATCH)[:, None]).astype(np.int32)
    return {
        "ref_features": features(),
        "text_ids": rng.integers(1, QF.vocab_size, (BATCH, TEXT_LEN)).astype(np.int32),
        "text_mask": mask,
        "tgt_features": features(),
        "caption_ids": rng.integers(1, QF.vocab_size, (BATCH, TEXT_LEN)).astype(np.int32),
        "caption_mask": mask,
        "target_index": rng.integers(0, 12, BATCH).astype(np.int32),  # some duplicate targets in a batch
    }


def _setup(mesh, tx, bank_config=BANK):
    init_fn = trainer.init_fn_for(MODEL, bank_config, image_tokens=IMAGE_TOKENS, text_len=TEXT_LEN)
    with nn.logical_axis_rules(RULES):
        state, shardings = train_state.create_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh, RULES)
        step = trainer.make_train_step(
            model_lib.CSMCIR(MODEL), tx, bank_config, LOSS, shardings, mesh, use_dropout=False
        )
    return state, step, shardings


def _run(mesh, step, state, batches):
    out = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        for batch in batches:
            state, step_metrics = step(state, trainer.to_device(batch, mesh))
            out.append(jax.device_get(step_metrics))
    return state, out


def _one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


TX = optax.sgd(0.5, momentum=0.5)  # Linear in the gradient (tight device-count comparison), with optimizer state.


@pytest.fixture(scope="module")
def one_device():
    """The 1-device mesh, its step function (compiled once for the module) and the initial state on the host."""
    mesh = _one_device_mesh()
    state, step, shardings = _setup(mesh, TX)
    return mesh, step, shardings, jax.device_get(state)


def _place(host_state, shardings):
    return jax.tree.map(jax.device_put, host_state, shardings)


def test_step_fills_the_bank_compiles_once_and_skips_a_nan_batch(one_device):
    mesh, step, shardings, initial = one_device
    state = _place(initial, shardings)
    batches = [_batch(i) for i in range(3)]
    state, logs = _run(mesh, step, state, batches)
    bank = jax.device_get(state.extra["bank"])
    assert int(state.step) == 3 and int(bank.ptr) == 3 * BATCH % BANK.size
    np.testing.assert_array_equal(bank.ids[: 3 * BATCH], np.concatenate([b["target_index"] for b in batches]))
    assert np.all(bank.ids[3 * BATCH :] == -1) and np.all(bank.step[BATCH : 2 * BATCH] == 1)
    np.testing.assert_allclose(np.linalg.norm(bank.feats[: 3 * BATCH], axis=-1), 1.0, rtol=1e-5)
    assert logs[0]["num_negatives"] < logs[2]["num_negatives"]  # the bank adds negatives once filled
    assert all(np.isfinite(log["loss"]) and log["skipped"] == 0.0 for log in logs)

    before = jax.device_get((state.params, state.opt_state, state.extra))
    poisoned = {**_batch(3), "ref_features": np.full((BATCH, IMAGE_TOKENS, QF.encoder_hidden_size), np.nan, np.float16)}
    state, (log,) = _run(mesh, step, state, [poisoned])
    assert log["skipped"] == 1.0 and int(state.step) == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state, state.extra)), before)
    state, (log,) = _run(mesh, step, state, [_batch(4)])
    assert log["skipped"] == 0.0 and int(jax.device_get(state.extra["bank"].ptr)) == 4 * BATCH % BANK.size
    assert step._cache_size() == 1  # five steps, the NaN one included, one compile


def test_train_step_on_8_devices_matches_one_device(one_device):
    """Step 1 from the same init (empty bank), then step 2 from the same state with a partly filled bank."""
    mesh_1, step_1, shardings_1, initial = one_device
    mesh_8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, step_8, shardings_8 = _setup(mesh_8, TX)
    runs = {1: (mesh_1, step_1, shardings_1), 8: (mesh_8, step_8, shardings_8)}
    first = {
        n: _run(mesh, step, _place(initial, shardings), [_batch(10)]) for n, (mesh, step, shardings) in runs.items()
    }
    after_first = jax.device_get(first[1][0])  # the 1-device state after step 1, placed on both meshes
    second = {
        n: _run(mesh, step, _place(after_first, shardings), [_batch(11)]) for n, (mesh, step, shardings) in runs.items()
    }
    assert second[8][0].extra["bank"].feats.sharding.spec[0] == sharding.BATCH_AXES
    assert second[1][1][0]["bank_valid_fraction"] > 0  # the bank takes part in step 2
    for result in (first, second):
        (state_1, logs_1), (state_8, logs_8) = result[1], result[8]
        for key in ("loss", "grad_norm", "batch_acc", "num_negatives", "bank_entropy"):
            np.testing.assert_allclose(logs_8[0][key], logs_1[0][key], rtol=1e-5, atol=1e-7, err_msg=key)
        # Parameters move by lr x gradient; cross-device reduction order changes gradients by ~1e-6 absolute.
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
            jax.device_get((state_8.params, state_8.extra)),
            jax.device_get((state_1.params, state_1.extra)),
        )


def test_bank_size_not_a_multiple_of_the_global_batch_is_a_config_error(tmp_path):
    config = csmcir_configs.get_config("cpu_test")
    config.bank.size = 60  # batch 16
    with pytest.raises(config_lib.ConfigError, match="bank size 60 is not a multiple of the global batch 16"):
        trainer.train(config, str(tmp_path))


def test_config_errors_and_presets():
    for preset in ("cpu_test", "cpu_demo", "cpu_demo_sprc", "fashioniq_blip2", "cirr_blip2"):
        trainer.check_config(csmcir_configs.get_config(preset))
    config = csmcir_configs.get_config("cpu_test")
    config.data.caption_field = "L9_bogus"
    with pytest.raises(config_lib.ConfigError, match="data.caption_field"):
        trainer.check_config(config)
    config = csmcir_configs.get_config("cpu_test")
    config.loss.aux_rtc = 1.0
    with pytest.raises(config_lib.ConfigError, match="use_prompt_tokens"):
        trainer.check_config(config)
    with pytest.raises(ValueError, match="unknown preset"):
        csmcir_configs.get_config("gpu")
    assert isinstance(csmcir_configs.get_config(), ml_collections.ConfigDict)


def test_onecycle_schedule_and_sprc_compat():
    config = csmcir_configs.get_config("cpu_test")
    config.optimizer.update(lr=1e-3, pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    config.train.update(epochs=4, batch_size=16)
    schedule = trainer.learning_rate_schedule(config, num_triplets=160)  # 10 steps per epoch, 40 steps
    np.testing.assert_allclose([schedule(0), schedule(10), schedule(40)], [1e-4, 1e-3, 1e-6], rtol=1e-5)
    config.optimizer.update(sprc_compat_schedule=True, sprc_schedule_epochs=8)
    compat = trainer.learning_rate_schedule(config, num_triplets=160)
    assert compat(20) == pytest.approx(1e-3) and compat(40) > 10 * schedule(40)  # never fully anneals


def test_clean_text_is_blip_caption_processing():
    assert trainer.clean_text('Make it RED; (and) "shiny"!!  now.') == "make it red and shiny now"
    assert len(trainer.clean_text("w " * 80).split()) == 50


# --- cpu_test end to end (in-process), then kill -9 mid-run and resume (subprocesses). ----------------------------

PRESET = "cpu_test"


def _final_state(workdir):
    steps = csmcir_configs.get_config(PRESET).train.max_steps
    restored = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(steps) / "state"))
    return restored["params"], restored["extra"], restored["step"]


def _committed(workdir):
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, python, subprocess_env, repo_root):
    """The cpu_test preset in-process (8 simulated devices, as the conftest sets), then the binary with 8 simulated
    devices killed with SIGKILL after its first checkpoint and resumed; all share one XLA cache."""
    cache_dir = str(tmp_path_factory.mktemp("xla_cache"))
    uninterrupted, killed = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("killed")
    config = csmcir_configs.get_config(PRESET)
    config.jax_cache_dir = cache_dir
    start = time.monotonic()
    trainer.train(config, str(uninterrupted))
    seconds = time.monotonic() - start
    env = {**subprocess_env, "JAX_NUM_CPU_DEVICES": str(jax.device_count())}
    command = [
        python,
        "-m",
        "experiments.csmcir",
        f"--config=experiments/configs/csmcir.py:{PRESET}",
        f"--workdir={killed}",
        f"--config.jax_cache_dir={cache_dir}",
    ]
    start = time.monotonic()
    victim = subprocess.Popen(
        command, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while not _committed(killed):
            assert victim.poll() is None, f"run ended early:\n{victim.stderr.read()[-3000:]}"
            assert time.monotonic() - start < 600, "no checkpoint within 600 s"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    killed_at = _committed(killed)
    resumed = subprocess.run(
        command, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {
        "uninterrupted": uninterrupted,
        "seconds": seconds,
        "killed": killed,
        "killed_at": killed_at,
        "victim_returncode": victim.returncode,
        "resumed_stderr": resumed.stderr,
    }


@pytest.mark.slow
def test_cpu_test_end_to_end(runs):
    workdir = runs["uninterrupted"]
    config = csmcir_configs.get_config(PRESET)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # log_every 2, plus the validation at step 3
    for key in ("loss", "batch_acc", "num_negatives", "grad_norm", "temperature", "bank_entropy"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["num_negatives"] > config.train.batch_size  # the bank adds negatives to the in-batch ones
    assert sum("select_score" in r for r in rows) == 2  # validated at steps 3 and 6
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == config.train.max_steps and results["split"] == "test"
    metrics_ = results["last"]
    assert set(metrics_) >= {"css/R@1", "css/R@5", "css/R@10", "css/R@50", "css/R_subset@1", "css/avg"}
    assert all(0.0 <= v <= 100.0 for v in metrics_.values())
    best = json.loads((workdir / "best.json").read_text())
    assert best["step"] in (3, 6) and best["split"] == "val"
    captions = json.loads((workdir / "captions" / "css" / "train" / "all_mcot.json").read_text())
    assert len(captions) > 0 and all("Final_Caption" in c for c in captions.values())
    for name in ("config.json", "metrics.png", "table.md", "tensorboard", "best"):
        assert (workdir / name).exists(), name
    _, extra, step = _final_state(workdir)
    assert int(step) == config.train.max_steps and set(extra) == {"bank"}
    print(f"cpu_test end to end in-process: {runs['seconds']:.1f} s")


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_the_same_params_and_bank(runs):
    assert runs["victim_returncode"] == -signal.SIGKILL
    max_steps = csmcir_configs.get_config(PRESET).train.max_steps
    assert runs["killed_at"] and max(runs["killed_at"]) < max_steps, "the run was not killed mid-run"
    assert f"restored step {max(runs['killed_at'])}" in runs["resumed_stderr"]
    expected, resumed = _final_state(runs["uninterrupted"]), _final_state(runs["killed"])
    for path, a in jax.tree_util.tree_flatten_with_path(expected)[0]:
        b = functools.reduce(lambda node, key: node[getattr(key, "key", getattr(key, "idx", None))], path, resumed)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    steps = [json.loads(line)["step"] for line in (runs["killed"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"
    assert os.path.exists(runs["killed"] / "results.json")


@pytest.mark.slow  # one train-step compile: 200 s on a shared, overloaded CPU core
def test_bank_enqueues_eval_mode_targets_when_asked():
    """With dropout, `bank.enqueue_eval_mode` enqueues the targets encoded without dropout by the pre-update params
    (which differ from the training pass's dropped-out targets)."""
    dropout_qf = qformer.QFormerConfig.tiny(
        num_hidden_layers=1, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5, num_query_tokens=4
    )
    model_config = model_lib.CSMCIRConfig.tiny(dropout_qf, target_pool="cls")
    bank_config = bank_lib.BankConfig(size=2 * BATCH, entropy_mode="none", enqueue_eval_mode=True)
    mesh = _one_device_mesh()
    init_fn = trainer.init_fn_for(model_config, bank_config, image_tokens=IMAGE_TOKENS, text_len=TEXT_LEN)
    model = model_lib.CSMCIR(model_config)
    with nn.logical_axis_rules(RULES):
        state, shardings = train_state.create_train_state(init_fn, TX, jax.random.PRNGKey(0), mesh, RULES)
        step = trainer.make_train_step(model, TX, bank_config, LOSS, shardings, mesh, use_dropout=True)
    batch = _batch(0)
    params = jax.device_get(state.params)
    inputs = (batch["tgt_features"], batch["caption_ids"], batch["caption_mask"])
    expected = model.apply({"params": params}, *inputs, deterministic=True, method="encode_target")
    rngs = {"dropout": jax.random.PRNGKey(1)}
    dropped = model.apply({"params": params}, *inputs, deterministic=False, rngs=rngs, method="encode_target")
    assert np.abs(np.asarray(dropped) - np.asarray(expected)).max() > 1e-3  # dropout changes the targets
    state, _ = _run(mesh, step, state, [batch])
    enqueued = jax.device_get(state.extra["bank"].feats[:BATCH])
    np.testing.assert_allclose(enqueued, expected, rtol=1e-5, atol=1e-6)
