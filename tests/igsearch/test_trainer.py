"""The IG-Search trainer: loss path, guarded updates, sharded step parity, learning from rollouts with IG, and the
cpu_test preset end to end, killed with SIGKILL and resumed (subprocesses)."""

import functools
import json
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from experiments.configs import igsearch as igsearch_configs
from jax_hd.core import checkpoint, sharding, train_state
from jax_hd.core import config as config_lib
from jax_hd.data.qa import QAExample
from jax_hd.data.tokenizer import train_bpe_tokenizer
from jax_hd.igsearch import experts, grpo, info_gain, rollout, trainer
from jax_hd.models import qwen2
from jax_hd.retrieval import Passage
from jax_hd.retrieval.client import SearchClient

TINY = qwen2.Qwen2Config.tiny(vocab_size=128, num_hidden_layers=1)
RULES = sharding.DEFAULT_RULES


def _one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _random_batch(rng, rows=8, prompt_len=6, response_len=10, vocab=TINY.vocab_size):
    """A left-padded prompt / right-padded response batch with GRPO fields; row lengths vary."""
    prompt_lengths = rng.integers(2, prompt_len + 1, rows)
    response_lengths = rng.integers(3, response_len + 1, rows)
    batch = {
        "prompt_tokens": rng.integers(0, vocab, (rows, prompt_len)).astype(np.int32),
        "prompt_mask": np.arange(prompt_len)[None] >= (prompt_len - prompt_lengths)[:, None],
        "response_tokens": rng.integers(0, vocab, (rows, response_len)).astype(np.int32),
        "response_mask": np.arange(response_len)[None] < response_lengths[:, None],
    }
    batch["loss_mask"] = batch["response_mask"] & (rng.random((rows, response_len)) < 0.8)
    batch["advantages"] = rng.normal(size=(rows, response_len)).astype(np.float32)
    return batch


def _state(mesh, tx, with_reference=True, seed=0):
    _, shardings = trainer.state_spec(TINY, tx, mesh, RULES, with_reference)
    params, _ = sharding.sharded_init(functools.partial(qwen2.init_params, TINY), jax.random.PRNGKey(seed), mesh=mesh)
    return trainer.state_from_params(params, tx, jax.random.PRNGKey(1), shardings, with_reference), shardings


# --- The loss path on a tiny case. -------------------------------------------------------------------------------


def test_response_logprobs_match_unpadded_rows():
    """Left-padded prompts and right-padded responses give each row the log-probs of its unpadded sequence."""
    model = qwen2.Qwen2LM(TINY)
    params = nn.unbox(qwen2.init_params(TINY, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    prompt_lengths, response_lengths = [2, 4, 6], [10, 8, 6]  # Every unpadded row has 12 tokens: one compile.
    batch = {
        "prompt_tokens": rng.integers(0, TINY.vocab_size, (3, 6)).astype(np.int32),
        "prompt_mask": np.arange(6)[None] >= (6 - np.array(prompt_lengths))[:, None],
        "response_tokens": rng.integers(0, TINY.vocab_size, (3, 10)).astype(np.int32),
        "response_mask": np.arange(10)[None] < np.array(response_lengths)[:, None],
    }
    logprobs, entropy = jax.jit(functools.partial(trainer.response_logprobs, model))(params, batch)

    @jax.jit
    def unpadded_logprobs(tokens):
        mask = jnp.ones_like(tokens, bool)
        logits, _ = model.apply({"params": params}, tokens, qwen2.positions_from_mask(mask), mask)
        return jax.nn.log_softmax(logits[0])

    for b in range(3):
        prompt = batch["prompt_tokens"][b][batch["prompt_mask"][b]]
        response = batch["response_tokens"][b][batch["response_mask"][b]]
        log_softmax = unpadded_logprobs(np.concatenate([prompt, response])[None])
        expected = log_softmax[len(prompt) - 1 : -1][np.arange(len(response)), response]
        np.testing.assert_allclose(logprobs[b, : len(response)], expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(entropy))


def test_grpo_objective_on_policy_is_minus_mean_advantage():
    """With old = reference = current log-probs the ratio is 1 and the KL is 0: loss = -mean(A) - c_H * entropy,
    and the gradient of the surrogate is the policy gradient -mean(A * grad log pi)."""
    model = qwen2.Qwen2LM(TINY)
    params = nn.unbox(qwen2.init_params(TINY, jax.random.PRNGKey(0)))
    batch = _random_batch(np.random.default_rng(1))
    logprobs, entropy = jax.jit(functools.partial(trainer.response_logprobs, model))(params, batch)
    batch = {**batch, "old_logprobs": logprobs, "ref_logprobs": logprobs}
    config = grpo.GRPOConfig(group_size=2, kl_coef=0.001, entropy_coef=0.001)
    loss, metrics = jax.jit(functools.partial(trainer.grpo_objective, model, config))(params, batch)
    mask = batch["loss_mask"]
    expected = -np.sum(batch["advantages"] * mask) / mask.sum() - 0.001 * np.sum(entropy * mask) / mask.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6) and float(metrics["clip_fraction"]) == 0.0

    no_entropy = grpo.GRPOConfig(group_size=2, kl_coef=0.0, entropy_coef=0.0)
    grads = jax.jit(jax.grad(lambda p: trainer.grpo_objective(model, no_entropy, p, batch)[0]))(params)

    def policy_gradient(p):
        lp, _ = trainer.response_logprobs(model, p, batch)
        return -jnp.sum(batch["advantages"] * lp * mask) / mask.sum()

    expected_grads = jax.jit(jax.grad(policy_gradient))(params)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7), grads, expected_grads)


def test_micro_batches_average_to_the_full_batch_for_equal_token_counts():
    model = qwen2.Qwen2LM(TINY)
    params = nn.unbox(qwen2.init_params(TINY, jax.random.PRNGKey(0)))
    batch = _random_batch(np.random.default_rng(2))
    batch = {**batch, "prompt_mask": np.ones_like(batch["prompt_mask"]),
             "response_mask": np.ones_like(batch["response_mask"]), "loss_mask": np.ones_like(batch["loss_mask"])}
    objective = functools.partial(trainer.sft_objective, model)
    full = jax.jit(lambda p, b: trainer.loss_and_grads(objective, p, b, 1))(params, batch)
    micro = jax.jit(lambda p, b: trainer.loss_and_grads(objective, p, b, 4))(params, batch)
    np.testing.assert_allclose(full[0], micro[0], rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7), full[2], micro[2])


# --- Host-side helpers. -------------------------------------------------------------------------------------------


def test_host_helpers():
    result = info_gain.IGResult(step_igs=[[0.5, float("nan")], [], [-0.2]], step_indices=[[0, 1], [], [1]],
                                r_ig=np.zeros(3, np.float32), diagnostics={})
    step_ig, step_mask = trainer.step_ig_arrays(result, batch=3, max_steps=2)
    np.testing.assert_array_equal(step_mask, [[True, False], [False, False], [False, True]])  # NaN IG dropped.
    np.testing.assert_allclose(step_ig, [[0.5, 0.0], [0.0, 0.0], [0.0, -0.2]])
    stats = trainer.group_statistics(np.array([0.1, 0.0, 1.0, 0.5]), np.array([0.0, 0.0, 1.0, 0.5]), 2)
    assert stats == {"all_fail_group_fraction": 0.5, "zero_advantage_group_fraction": 0.0}
    padded = trainer.pad_rows({"x": np.ones((3, 2), bool)}, 4)
    assert padded["x"].shape == (4, 2) and not padded["x"][3].any()
    assert trainer.row_quantum(80, 2, 8) == 40 and trainer.row_quantum(6, 4, 4) == 4


def test_padded_policy_pads_rows_and_returns_only_the_real_ones():
    class Echo:
        def __init__(self):
            self.sizes = []

        def generate(self, contexts, *, max_new_tokens, stop_strings):
            self.sizes.append(len(contexts))
            return [list(c[-1:]) for c in contexts]

    echo = Echo()
    policy = trainer.PaddedPolicy(echo, quantum=4)
    assert policy.generate([[1], [2], [3], [4], [5]], max_new_tokens=1, stop_strings=()) == [[1], [2], [3], [4], [5]]
    assert policy.generate([[7]], max_new_tokens=1, stop_strings=()) == [[7]]
    assert echo.sizes == [8, 4]


# --- Guarded updates. ----------------------------------------------------------------------------------------------


def test_nonfinite_loss_skips_the_update_and_the_guard_stops_the_run():
    mesh = _one_device_mesh()
    tx = optax.adam(1e-2)
    state, shardings = _state(mesh, tx)
    model = qwen2.Qwen2LM(TINY)
    step = trainer.make_train_step(functools.partial(trainer.grpo_objective, model, grpo.GRPOConfig(group_size=2)),
                                   tx, shardings, mesh, trainer.GRPO_KEYS)
    batch = _random_batch(np.random.default_rng(3))
    batch["old_logprobs"] = batch["ref_logprobs"] = np.zeros(batch["advantages"].shape, np.float32) - 3.0
    before = jax.device_get(state.params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        state, metrics = step(state, trainer.to_device({**batch, "advantages": batch["advantages"] * np.nan}, mesh))
        assert float(metrics["skipped"]) == 1.0 and int(state.step) == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
        state, metrics = step(state, trainer.to_device(batch, mesh))
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 2
    assert not np.allclose(jax.device_get(state.params)["embed_tokens"]["embedding"],
                           before["embed_tokens"]["embedding"])

    guard = train_state.NonFiniteGuard(max_in_a_row=2)
    guard.update(True, 1)
    guard.update(False, 2)  # A finite update resets the count.
    guard.update(True, 3)
    with pytest.raises(train_state.NonFiniteError, match="2 consecutive updates"):
        guard.update(True, 4)


# --- The train step on a simulated 8-device mesh matches one device. ------------------------------------------------


def test_grpo_step_on_8_devices_matches_one_device():
    tx = optax.sgd(0.5)  # SGD: the update is linear in the gradient, so the comparison is tight.
    config = grpo.GRPOConfig(group_size=2)
    model = qwen2.Qwen2LM(TINY)
    objective = functools.partial(trainer.grpo_objective, model, config)
    batch = _random_batch(np.random.default_rng(4))
    batch["old_logprobs"] = np.full(batch["advantages"].shape, -4.0, np.float32)
    batch["ref_logprobs"] = np.full(batch["advantages"].shape, -4.5, np.float32)
    results = []
    for mesh in (_one_device_mesh(), sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        state, shardings = _state(mesh, tx)
        step = trainer.make_train_step(objective, tx, shardings, mesh, trainer.GRPO_KEYS, num_micro=2)
        with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
            state, metrics = step(state, trainer.to_device(batch, mesh))
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (params_1, metrics_1), (params_8, metrics_8) = results
    for key in ("loss", "grad_norm", "kl", "clip_fraction", "entropy"):
        np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=1e-5, atol=1e-7)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), params_8, params_1)


# --- Learning from rollouts with IG (expert trajectories as the rollouts). -----------------------------------------


class FactRetriever:
    """Passage i of a query states the fact of the question whose keyword the query holds (others are noise)."""

    FACTS = {"zorb": "The capital of Zorbland is Quillton.", "mip": "The river Mip is 4821 km long.",
             "tarn": "Tarn was founded in 1642 by sailors.", "vell": "The Vell tower is made of basalt stone."}

    def search(self, queries, topk):
        out = []
        for query in queries:
            key = next((k for k in self.FACTS if k in query.lower()), None)
            facts = [self.FACTS[key]] if key else []
            facts += [f"Unrelated note {i} about weather and trains." for i in range(topk - len(facts))]
            out.append([Passage(str(i), f'"Doc {i}"\n{text}', 1.0) for i, text in enumerate(facts)])
        return out


QUESTIONS = [("What is the capital of Zorbland", "Quillton"), ("How long is the river Mip", "4821"),
             ("When was Tarn founded", "1642"), ("What is the Vell tower made of", "basalt")]


@pytest.fixture(scope="module")
def tiny_world():
    texts = [f"{q}? {a}. " + " ".join(FactRetriever.FACTS.values()) for q, a in QUESTIONS] * 20
    tokenizer = train_bpe_tokenizer(texts + [rollout.make_prompt(q, "autorefine") for q, _ in QUESTIONS],
                                    vocab_size=400)
    client = SearchClient(retriever=FactRetriever(), max_retries=0, backoff_s=0.0)
    examples = [QAExample(f"q{i}", q, (a,), "toy", "train") for i, (q, a) in enumerate(QUESTIONS)]
    return tokenizer, client, examples


@pytest.fixture(scope="module")
def runtime(tiny_world):
    """A cpu_test runtime over the toy world and a holder of its (donated, so carried) state."""
    tokenizer, client, _ = tiny_world
    config = igsearch_configs.get_config("cpu_test")
    config.trainer.update(prompt_buckets=[512], response_buckets=[384], mini_batch_size=4, micro_batch_size=2)
    config.ig.update(context_buckets=[1024], answer_buckets=[8])
    model_config = qwen2.Qwen2Config.tiny(vocab_size=-(-len(tokenizer) // 128) * 128, num_hidden_layers=1,
                                          tie_word_embeddings=True)
    mesh = _one_device_mesh()
    tx = trainer.grpo_optimizer(config)
    _, shardings = trainer.state_spec(model_config, tx, mesh, RULES, True)
    rt = trainer.build_runtime(config, mesh, RULES, tokenizer, client, model_config, tx, shardings)
    params, _ = sharding.sharded_init(functools.partial(qwen2.init_params, model_config), jax.random.PRNGKey(0),
                                      mesh=mesh)
    return rt, {"state": trainer.state_from_params(params, tx, jax.random.PRNGKey(1), shardings, True)}


def test_expert_trajectories_have_the_rollout_layout(tiny_world):
    tokenizer, client, examples = tiny_world
    config = rollout.RolloutConfig(max_turns=2, max_observation_tokens=200, max_response_tokens=384)
    trajectories = experts.expert_trajectories(examples, client, tokenizer, config, max_query_words=8)
    assert len(trajectories) == len(examples)
    t = trajectories[0]
    text = tokenizer.decode(t.response_ids)
    assert text.startswith(experts.THINK_TEXT + "<search> What is the capital of Zorbland </search>")
    assert "<refine> The capital of Zorbland is Quillton. </refine>\n<answer> Quillton </answer>" in text
    (step,) = t.steps
    assert tokenizer.decode(t.response_ids[slice(*step.query_span)]).strip() == step.query
    observation = slice(*step.observation_span)
    assert not any(t.policy_mask[observation]) and all(t.policy_mask[: step.observation_span[0]])
    assert t.response_ids[-1] == tokenizer.eos_token_id


def test_counterfactual_only_trains_on_the_renamed_copies_alone(tiny_world):
    tokenizer, client, examples = tiny_world
    config = igsearch_configs.get_config("cpu_test")
    config.warm_start.counterfactual_copies = 1
    both = trainer.expert_batch(config, examples, tokenizer, client)
    config.warm_start.counterfactual_only = True
    renamed = trainer.expert_batch(config, examples, tokenizer, client)
    assert len(both["prompt_tokens"]) == 2 * len(renamed["prompt_tokens"]) == 2 * len(examples)
    originals = {tuple(row) for row in both["response_tokens"][: len(examples)]}
    assert not originals & {tuple(row) for row in renamed["response_tokens"]}


def test_expert_hops_of_embedded_question_types():
    bridge = QAExample("b", 'A sentence about Ada reads: "Ada met X in Paris." Which year fills the blank in this '
                            'sentence about X: "X was born in ___ in Turin."?', ("1815",), "s", "train", hops=2,
                       gold_article_ids=("Ada", "Bob Smith (painter)"), question_type="bridge_year")
    hops = experts.expert_hops(bridge, max_query_words=12)
    assert [h.query for h in hops] == ["Ada Ada met in Paris.", "Bob Smith was born in in Turin."]
    assert [h.target for h in hops] == ["Bob Smith", "1815"]
    cloze = QAExample("c", 'Which name fills the blank in this sentence about Rome: "It was ruled by ___ once."?',
                      ("Caesar",), "s", "train", question_type="cloze_name")
    assert [h.query for h in experts.expert_hops(cloze, 3)] == ["Rome It was"]


def test_warm_start_examples_keep_the_requested_share_of_multi_hop_questions():
    examples = [QAExample(f"q{i}", "q", ("a",), "s", "train", hops=1 + (i % 2)) for i in range(20)]
    config = igsearch_configs.get_config("cpu_test")
    config.warm_start.num_examples = 16
    assert trainer.warm_start_examples(config, examples) == examples[:16]
    config.warm_start.multi_hop_fraction = 0.2  # 8 single-hop questions, so 2 multi-hop ones (the first two)
    chosen = trainer.warm_start_examples(config, examples)
    assert [e.id for e in chosen if e.hops == 2] == ["q1", "q3"] and sum(e.hops == 1 for e in chosen) == 8
    config.warm_start.multi_hop_fraction = 0.0
    assert all(e.hops == 1 for e in trainer.warm_start_examples(config, examples))
    config.warm_start.multi_hop_fraction = 1.0
    assert [e.id for e in trainer.warm_start_examples(config, examples)] == [f"q{i}" for i in range(1, 16, 2)]


def test_learn_from_rollouts_gives_query_tokens_a_gradient_when_all_rewards_are_equal(tiny_world, runtime):
    tokenizer, client, examples = tiny_world
    rt, holder = runtime
    pair = examples[:2]
    trajectories = experts.expert_trajectories([ex for ex in pair for _ in range(rt.group_size)], client, tokenizer,
                                               rt.rollout_config, max_query_words=8)
    golds = [list(ex.golden_answers) for ex in pair for _ in range(rt.group_size)]
    before = jax.device_get(holder["state"].params)
    step = int(holder["state"].step)
    state, metrics = trainer.learn_from_rollouts(rt, holder["state"], trajectories, golds, iteration=1)
    assert metrics["reward_mean"] == 1.0 and metrics["zero_advantage_group_fraction"] == 1.0
    assert metrics["ig_steps"] == 4 and metrics["ig/n_sequences"] == 4 * (1 + rt.ig_config.n_random)
    assert np.isfinite(metrics["ig_mean"]) and metrics["skipped"] == 0.0 and int(state.step) == step + 1
    # Every outcome advantage is zero: the surrogate is non-zero only through the IG on the query tokens.
    assert metrics["pg_loss"] != 0.0
    assert not np.allclose(jax.device_get(state.params)["embed_tokens"]["embedding"],
                           before["embed_tokens"]["embedding"])
    state, metrics_off = trainer.learn_from_rollouts(rt, state, trajectories, golds, iteration=2, ig_enabled=False)
    holder["state"] = state
    assert metrics_off["ig_steps"] == 0 and metrics_off["pg_loss"] == 0.0


def test_credit_statistics():
    # Two groups of two: group 0 all fail (row 0 has an IG-credited query token), group 1 has a correct rollout.
    advantages = np.array([[0.0, 0.7, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], np.float32)
    query = np.array([[0, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]], bool)
    scores = np.array([0.0, 0.0, 1.0, 0.0], np.float32)
    step_ig = np.array([[0.5, 0.0], [-0.5, 0.0], [2.0, 1.0], [0.0, 0.0]], np.float32)
    step_mask = np.array([[1, 0], [1, 0], [1, 1], [1, 0]], bool)
    stats = trainer.credit_statistics(advantages, query, scores, 2, step_ig, step_mask)
    assert stats == {"all_fail_query_credit_fraction": 1.0, "ig_mean_correct": 1.5, "ig_mean_incorrect": 0.0}
    stats = trainer.credit_statistics(np.zeros_like(advantages), query, np.zeros(4, np.float32), 2, step_ig,
                                      np.zeros_like(step_mask))
    assert stats == {"all_fail_query_credit_fraction": 0.0}


def test_a_batch_without_search_steps_trains_without_ig(tiny_world, runtime):
    tokenizer, _, examples = tiny_world
    rt, holder = runtime
    trajectories = []
    for i, ex in enumerate(examples):
        t = rollout.Trajectory(prompt_ids=rollout.encode_prompt(tokenizer, ex.question, "autorefine"))
        answer = ex.golden_answers[0] if i % 2 else "no idea"
        t.append(tokenizer.encode(f"<think> guess </think>\n<answer> {answer} </answer>"), by_policy=True)
        trajectories.append(t)
    golds = [list(ex.golden_answers) for ex in examples]
    step = int(holder["state"].step)
    state, metrics = trainer.learn_from_rollouts(rt, holder["state"], trajectories, golds, iteration=3)
    holder["state"] = state
    assert metrics["ig_steps"] == 0 and metrics["ig/n_sequences"] == 0 and metrics["searches_per_rollout"] == 0
    assert metrics["all_fail_group_fraction"] == 0.0 and metrics["skipped"] == 0.0 and int(state.step) == step + 1


# --- Config and checkpoint errors. ----------------------------------------------------------------------------------


def test_inconsistent_batch_sizes_are_a_config_error():
    config = igsearch_configs.get_config("cpu_test")
    config.trainer.mini_batch_size = 3
    with pytest.raises(config_lib.ConfigError, match="not a multiple of trainer.mini_batch_size = 3"):
        trainer.check_config(config)
    config = igsearch_configs.get_config("cpu_test")
    config.ig.transform = "softmax"
    with pytest.raises(config_lib.ConfigError, match="config.ig.transform"):
        trainer.check_config(config)
    config = igsearch_configs.get_config("cpu_test")
    config.warm_start.counterfactual_only = True
    with pytest.raises(config_lib.ConfigError, match="counterfactual_only needs"):
        trainer.check_config(config)
    for preset in ("cpu_test", "cpu_demo", "qwen2_5_3b_tpu"):
        trainer.check_config(igsearch_configs.get_config(preset))


def test_ig_answer_join_is_validated_and_reaches_the_ig_config():
    config = igsearch_configs.get_config("cpu_test")
    assert trainer.ig_config_from(config, pad_id=0).answer_join == config.ig.answer_join == "reference"
    config.ig.answer_join = "space_joined"
    trainer.check_config(config)
    assert trainer.ig_config_from(config, pad_id=0).answer_join == "space_joined"
    config.ig.answer_join = "glued"
    with pytest.raises(config_lib.ConfigError, match="config.ig.answer_join"):
        trainer.check_config(config)


def test_checkpoint_of_another_model_names_the_parameter(tmp_path):
    mesh = _one_device_mesh()
    tx = optax.adam(1e-3)
    state, _ = _state(mesh, tx)
    with checkpoint.Checkpointer(tmp_path, save_every=1, handle_sigterm=False) as ckpt:
        ckpt.save(1, state, force=True)
        ckpt.wait()
        wider = qwen2.Qwen2Config.tiny(vocab_size=128, num_hidden_layers=1, intermediate_size=256)
        target, _ = trainer.state_spec(wider, tx, mesh, RULES, True)
        message = "'params.layers_0.mlp.down_proj.kernel' has shape \\(128, 64\\) in the checkpoint"
        with pytest.raises(checkpoint.CheckpointMismatchError, match=message):
            ckpt.restore(target)


# --- cpu_test end to end, and kill -9 + resume (subprocesses). ------------------------------------------------------

CONFIG = "--config=experiments/configs/igsearch.py:cpu_test"


def _command(python, workdir, cache_dir):
    return [python, "-m", "experiments.igsearch", CONFIG, f"--workdir={workdir}", f"--config.jax_cache_dir={cache_dir}"]


def _start(python, workdir, cache_dir, env, cwd):
    return subprocess.Popen(_command(python, workdir, cache_dir), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc):
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def _final_params(workdir):
    """(params, extra, step) of the last checkpoint, restored as saved (the tokenizer fixes the vocabulary)."""
    state_dir = workdir / "checkpoints" / str(igsearch_configs.get_config("cpu_test").trainer.steps) / "state"
    restored = ocp.StandardCheckpointer().restore(str(state_dir))
    return restored["params"], restored["extra"], restored["step"]


def _committed(workdir):
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, python, subprocess_env, repo_root):
    """An uninterrupted cpu_test run, then a second one killed with SIGKILL right after its first GRPO checkpoint and
    resumed (the later runs reuse the XLA cache the first one filled)."""
    cache_dir = str(tmp_path_factory.mktemp("xla_cache"))
    uninterrupted, killed = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("killed")
    start = time.monotonic()
    _finish(_start(python, uninterrupted, cache_dir, subprocess_env, repo_root))
    seconds = time.monotonic() - start
    victim = _start(python, killed, cache_dir, subprocess_env, repo_root)
    try:
        while 1 not in _committed(killed):
            assert victim.poll() is None, f"run ended early:\n{victim.stderr.read()[-3000:]}"
            assert time.monotonic() - start < 600, "no GRPO checkpoint within 600 s"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    killed_at = _committed(killed)
    resumed_stderr = _finish(_start(python, killed, cache_dir, subprocess_env, repo_root))
    return {"uninterrupted": uninterrupted, "seconds": seconds, "killed": killed, "killed_at": killed_at,
            "victim_returncode": victim.returncode, "resumed_stderr": resumed_stderr}


@pytest.mark.slow
def test_cpu_test_end_to_end(runs):
    workdir = runs["uninterrupted"]
    config = igsearch_configs.get_config("cpu_test")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward_mean", "em", "all_fail_group_fraction", "ig_mean", "ig_positive_fraction", "kl", "entropy",
                "clip_fraction", "searches_per_rollout", "response_length", "time/step_s"):
        assert np.isfinite(rows[-1][key]), key
    evals = json.loads((workdir / "eval.json").read_text())
    assert {"before_grpo", "after_grpo"} <= set(evals)
    assert sum(v["num_questions"] for k, v in evals["after_grpo"].items() if k != "average") == \
        config.data.max_eval_questions
    for name in ("config.json", "metrics.png", "final_metrics.json", "eval_records_after_grpo.jsonl",
                 "warm_start/metrics.jsonl", "tensorboard"):
        assert (workdir / name).exists(), name
    _, extra, step = _final_params(workdir)
    assert int(step) == config.trainer.steps * trainer.updates_per_step(config)
    assert set(extra) == {"ref_params"}
    print(f"cpu_test end to end (cold XLA cache): {runs['seconds']:.1f} s")


@pytest.mark.slow
def test_kill_9_mid_grpo_then_resume_gives_the_same_params(runs):
    assert runs["victim_returncode"] == -signal.SIGKILL
    assert runs["killed_at"] == [1], "the run was not killed in the middle of GRPO"
    assert "restored step 1" in runs["resumed_stderr"]
    expected, resumed = _final_params(runs["uninterrupted"]), _final_params(runs["killed"])
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(line)["step"] for line in (runs["killed"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"


def test_configs_are_config_dicts():
    assert isinstance(igsearch_configs.get_config(), ml_collections.ConfigDict)
    with pytest.raises(ValueError, match="unknown preset"):
        igsearch_configs.get_config("gpu")
