"""Information gain: parsing and skeletons, the random pool, head weighting, IG arithmetic, and a real tiny Qwen2
(trained in the test to copy the refined answer) scored through the bucketed, sharded scorer."""

import dataclasses
import functools
import re

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn

from jax_hd.core import sharding
from jax_hd.data.tokenizer import AGENT_TAGS, train_bpe_tokenizer
from jax_hd.igsearch import info_gain as ig
from jax_hd.igsearch import rollout
from jax_hd.models import qwen2
from jax_hd.retrieval.client import DEFAULT_FAILURE_TEXT, format_observation


class ByteTokenizer:
    """UTF-8 bytes shifted by one (0 is padding); `decode` has no `skip_special_tokens` (exercises the fallback)."""

    def encode(self, text, add_special_tokens=False):
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")


BYTES = ByteTokenizer()


@dataclasses.dataclass
class Obs:
    body: str
    failed: bool = False


@dataclasses.dataclass
class Inserted:
    text: str


def make_trajectory(tokenizer, prompt, segments):
    """A trajectory as `rollout.run_rollouts` builds it: policy text (str), observations (Obs), hints (Inserted)."""
    trajectory = rollout.Trajectory(prompt_ids=tokenizer.encode(prompt, add_special_tokens=False))
    query = None
    for segment in segments:
        if isinstance(segment, Obs):
            ids = tokenizer.encode(format_observation(segment.body, "documents"), add_special_tokens=False)
            span = trajectory.append(ids, by_policy=False)
            trajectory.steps.append(rollout.SearchStep(query[0], query[1], span, (), segment.failed))
        elif isinstance(segment, Inserted):
            trajectory.append(tokenizer.encode(segment.text, add_special_tokens=False), by_policy=False)
        else:
            ids = tokenizer.encode(segment, add_special_tokens=False)
            start, _ = trajectory.append(ids, by_policy=True)
            action, content, chars = rollout.parse_action(segment)
            if action == "search":
                a, b = rollout.char_span_to_token_span(tokenizer, ids, chars)
                query = (content, (start + a, start + b))
    return trajectory


PROMPT = rollout.make_prompt("Where was Ada born", "autorefine")  # Mentions <search>, <documents>, <refine>.
RESPONSE = (
    "<think>I need the birthplace.</think>\n<search> Ada birthplace </search>"
    '\n\n<documents>Doc 1(Title: "Ada") Ada was born in London.</documents>\n\n'
    "<refine>Ada: London</refine>\n<think>Check the year too.</think>\n<search> Ada birth year </search>"
    '\n\n<documents>Doc 1(Title: "Ada") Born 1815.</documents>\n\n'
    "<refine>1815\n<search> Ada father </search>"
    '\n\n<documents>Doc 1(Title: "Byron") Lord Byron.</documents>\n\n'
    "<answer> London </answer>"
)


# ----------------------------------------------------------------------------------------------------------------
# Text.


def test_parse_steps_and_skeleton():
    steps = ig.parse_steps(RESPONSE)
    assert [s.search for s in steps] == ["<search> Ada birthplace </search>", "<search> Ada birth year </search>",
                                         "<search> Ada father </search>"]
    assert steps[0].documents == '<documents>Doc 1(Title: "Ada") Ada was born in London.</documents>'
    assert steps[0].refine == "<refine>Ada: London</refine>"
    assert steps[1].refine == "<refine>1815</refine>"  # Unclosed: ends at the next <search>, closed synthetically.
    assert steps[2].refine == ""
    assert RESPONSE[steps[1].documents_start:].startswith("<documents>Doc 1(Title: \"Ada\") Born")

    prefix = ig.context_prefix(PROMPT, RESPONSE)
    assert prefix == PROMPT + "<think>I need the birthplace.</think>"  # The prompt's <search> mention is not a cut.
    real = ig.build_context(prefix, steps, 1)
    assert real == prefix + (
        '\n<search> Ada birthplace </search>\n<documents>Doc 1(Title: "Ada") Ada was born in London.</documents>'
        "\n<refine>Ada: London</refine>"
        '\n<search> Ada birth year </search>\n<documents>Doc 1(Title: "Ada") Born 1815.</documents>'
        "\n<refine>1815</refine>"
    )
    assert "Check the year" not in real and "Ada father" not in real and "Byron" not in real
    random = ig.build_context(prefix, steps, 1, ("<documents>Other text.</documents>", "<refine>other</refine>"))
    assert random == real.replace('<documents>Doc 1(Title: "Ada") Born 1815.</documents>\n<refine>1815</refine>',
                                  "<documents>Other text.</documents>\n<refine>other</refine>")
    no_refine = ig.build_context(prefix, steps, 0, ("<documents>Other text.</documents>", ""))
    assert no_refine == prefix + "\n<search> Ada birthplace </search>\n<documents>Other text.</documents>"
    assert ig.build_context(prefix, steps, 2).endswith("<search> Ada father </search>\n" + steps[2].documents)


def test_parse_tolerates_truncated_documents_hints_and_template_mentions():
    response = (
        "no tags" + rollout.INVALID_ACTION_HINT + "<search> q1 </search>"  # The hint holds "<search> and </search>".
        "\n\n<documents>Doc 1 cut off by the obs"  # Truncated observation: no </documents>.
        "<refine>r1</refine><search> q2 </search>\n\n<documents>Doc 2 complete</documents>\n\n<refine>r2</refine>"
    )
    steps = ig.parse_steps(response)
    assert [(s.search, s.documents, s.refine) for s in steps] == [
        ("<search> q1 </search>", "<documents>Doc 1 cut off by the obs</documents>", "<refine>r1</refine>"),
        ("<search> q2 </search>", "<documents>Doc 2 complete</documents>", "<refine>r2</refine>"),
    ]
    # The prefix ends at the first <search> of the response, the hint's, as the reference does.
    assert ig.context_prefix("P:", response) == "P:no tags\nMy previous action is invalid. If I want to search, " \
                                                "I should put the query between"
    # The template's "<documents> and </documents>" would be a step if the prompt were parsed: only the response is.
    assert len(ig.parse_steps(PROMPT + RESPONSE)) == 4 and len(ig.parse_steps(RESPONSE)) == 3
    assert ig.parse_steps("<think>just thinking</think><answer> x </answer>") == []
    search_r1 = ig.parse_steps(
        "<search> q </search>\n\n<information>Doc 1 about q</information>\n\n<answer> a </answer>", "information")
    assert [(s.search, s.documents, s.refine) for s in search_r1] == [
        ("<search> q </search>", "<information>Doc 1 about q</information>", "")]
    steps = ig.rollout_steps_from_text(PROMPT, "<answer> London </answer>", ig.IGConfig())
    assert steps.blocks == () and steps.prefix == PROMPT + "<answer> London </answer>"


def test_rollout_steps_follow_trajectory_steps():
    trajectory = make_trajectory(BYTES, PROMPT, [
        "<think>plan</think>\n<search> q1 </search>", Obs("val=1 real documents"),
        "<refine>r1</refine>\n<documents>made up by the policy</documents>\n<search> q2 </search>",
        Obs(DEFAULT_FAILURE_TEXT, failed=True),
        "<search> q3 </search>", Obs("tiny"),
        "<search> q4 </search>", Obs("val=4 more documents"),
        "<refine>r4", "\n<answer> a </answer>",
    ])
    steps = ig.rollout_steps(trajectory, BYTES, ig.IGConfig())
    assert steps.step_indices == (0, 1, 2, 3) and steps.valid == (True, False, False, True)
    assert [b.search for b in steps.blocks] == [f"<search> q{i} </search>" for i in range(1, 5)]
    assert steps.blocks[3].refine == "<refine>r4</refine>" and steps.blocks[3].documents.startswith("<documents>val=4")
    assert steps.prefix == PROMPT + "<think>plan</think>"
    assert "made up" not in ig.build_context(steps.prefix, steps.blocks, 3)  # Policy-written observations drop.
    failed_kept = ig.rollout_steps(trajectory, BYTES, ig.IGConfig(skip_failed_searches=False, min_documents_chars=4))
    assert failed_kept.valid == (True, True, True, True)


def test_config_validation():
    with pytest.raises(ValueError, match="aggregation"):
        ig.IGConfig(aggregation="median")
    with pytest.raises(ValueError, match="largest context bucket"):
        ig.IGConfig(max_context_tokens=8192)
    with pytest.raises(ValueError, match="n_random >= 1"):
        ig.IGConfig(n_random=0)
    with pytest.raises(ValueError, match="dialect"):
        ig.IGConfig(dialect="react")
    assert ig.IGConfig(context_buckets=[4096, 256]).context_buckets == (256, 4096)
    assert ig.IGConfig(dialect="search_r1").observation_tag == "information"
    with pytest.raises(ValueError, match="answer_join"):
        ig.IGConfig(answer_join="glued")


# ----------------------------------------------------------------------------------------------------------------
# Pool.


def _steps(*pairs, prefix="P"):
    blocks = tuple(ig.StepBlocks("<search> q </search>", f"<documents>{d}</documents>", r, 0) for d, r in pairs)
    config = ig.IGConfig()
    return ig.RolloutSteps(prefix, blocks, tuple(range(len(blocks))), tuple(ig._is_valid(b, False, config)
                                                                               for b in blocks))


def test_pool_admission_and_exclusion():
    rollouts = [_steps(("docs of A one", "<refine>a</refine>"), ("short", "")),
                _steps(("docs of A two", "")),
                _steps(("docs of B one", ""), ("docs of A one", "<refine>a</refine>"))]
    pool = ig.build_pool(rollouts, ["A", "A", "B"])
    assert [(e.trajectory, e.step, e.group) for e in pool] == [(0, 0, "A"), (1, 0, "A"), (2, 0, "B"), (2, 1, "B")]
    target = pool[0].pair
    # Same-question exclusion drops the sibling; the identical pair is excluded by text even from question B.
    assert ig.pool_candidates(pool, target, "A", exclude_same_question=True) == ([2], 0)
    assert ig.pool_candidates(pool, target, "A", exclude_same_question=False) == ([1, 2], 0)
    # One question only: fall back to the reference rule, then to the whole pool.
    solo = ig.build_pool(rollouts[:2], ["A", "A"])
    assert ig.pool_candidates(solo, solo[0].pair, "A", exclude_same_question=True) == ([1], 1)
    lone = ig.build_pool(rollouts[:1], ["A"])
    assert ig.pool_candidates(lone, lone[0].pair, "A", exclude_same_question=True) == ([0], 2)


def test_sample_pairs_replacement_rules_and_determinism():
    pool = [ig.PoolEntry(f"<documents>d{i}</documents>", "", i, 0, i % 3) for i in range(9)]
    target, group = pool[0].pair, 0  # Candidates: the 6 entries of groups 1 and 2.
    draws, level = ig.sample_pairs(pool, target, group, 3, True, np.random.default_rng(0))
    assert level == 0 and len({e.trajectory for e in draws}) == 3 and all(e.group != 0 for e in draws)
    again, _ = ig.sample_pairs(pool, target, group, 3, True, np.random.default_rng(0))
    assert again == draws
    draws, _ = ig.sample_pairs(pool, target, group, 6, True, np.random.default_rng(1))
    assert sorted(e.trajectory for e in draws) == [1, 2, 4, 5, 7, 8]  # Exactly N candidates: no repeats.
    draws, _ = ig.sample_pairs(pool[:3], target, group, 5, True, np.random.default_rng(2))
    assert len(draws) == 5 and {e.trajectory for e in draws} <= {1, 2}  # Too few: with replacement.


# ----------------------------------------------------------------------------------------------------------------
# Scores and IG.


def test_head_weights_and_weighted_score():
    np.testing.assert_allclose(ig.head_weights(4), [0.3, 0.3, 0.3, 0.1])
    np.testing.assert_allclose(ig.head_weights(2), [0.5, 0.5])
    np.testing.assert_allclose(ig.head_weights(5, n_head_tokens=1, head_weight=2.0), [1 / 3] + [1 / 6] * 4)
    assert ig.weighted_score(np.array([-1.0, -2.0, -3.0, -4.0])) == pytest.approx(0.3 * -6 - 0.4)
    # The reference's formula: weights renormalised to mean 1, then the mean over the L tokens.
    lp = np.array([-0.5, -1.5, -0.25, -2.0, -3.0])
    w = np.array([3.0, 3, 3, 1, 1])
    assert ig.weighted_score(lp) == pytest.approx(np.sum(lp * w / w.mean()) / 5)
    assert ig.weighted_score(np.zeros(0)) == 0.0


def test_ig_from_scores_best_variant_and_aggregation():
    def seq(r, step, variant, kind):
        return ig.ScoringSequence(r, step, variant, kind, "ctx", "gold", (r, step))

    sequences = [seq(0, 0, 0, ig.REAL), seq(0, 0, 0, ig.RANDOM), seq(0, 0, 0, ig.RANDOM),
                 seq(0, 0, 1, ig.REAL), seq(0, 0, 1, ig.RANDOM), seq(0, 0, 1, ig.RANDOM),
                 seq(0, 2, 0, ig.REAL), seq(0, 2, 0, ig.RANDOM), seq(0, 2, 0, ig.RANDOM)]
    scores = [-2.0, -5.0, -3.0, -1.0, -1.5, -2.5, -4.0, -1.0, -2.0]
    result = ig.ig_from_scores(sequences, scores, num_rollouts=2, aggregation="sum")
    # Step 0: variant 1 has the best REAL score (-1): IG = -1 - mean(-1.5, -2.5) = 1. Step 2: -4 - (-1.5) = -2.5.
    assert result.step_igs == [[pytest.approx(1.0), pytest.approx(-2.5)], []]
    assert result.step_indices == [[0, 2], []]
    np.testing.assert_allclose(result.r_ig, [-1.5, 0.0])
    d = result.diagnostics
    assert d["ig/n_search_steps"] == 2 and d["ig/positive_ig_ratio"] == 0.5 and d["ig/n_sequences"] == 9
    assert d["ig/step_ig_max"] == pytest.approx(1.0) and d["ig/step_ig_min"] == pytest.approx(-2.5)
    assert d["ig/step_ig_std"] == pytest.approx(1.75) and d["ig/logp_real_mean"] == pytest.approx(-2.5)
    assert d["ig/logp_baseline_mean"] == pytest.approx(-1.75) and d["ig/r_ig_mean"] == pytest.approx(-1.5)
    assert ig.aggregate([1.0, 3.0], "mean") == 2.0 and ig.aggregate([1.0, 3.0], "max") == 3.0
    assert ig.aggregate([], "mean") == 0.0
    assert ig.gold_variants({"target": np.array(["a", "b", "c"])}, 2) == ["a", "b"]
    assert ig.gold_variants("x", 3) == ["x"] and ig.gold_variants(["y", "z"], 1) == ["y"]


class ValueScorer:
    """Every answer token gets log-prob -v/10, v from the last `val=v` in the context (the target's documents)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, params, contexts, answers):
        self.calls += 1
        values = [int(re.findall(r"val=(\d+)", BYTES.decode(c))[-1]) for c in contexts]
        return [np.full(len(a), -v / 10.0, np.float32) for v, a in zip(values, answers, strict=True)]


def _question(i, k, val):
    """Rollout k of question i: one search whose documents hold `val`."""
    return make_trajectory(BYTES, f"Q{i}: who?\n", [f"<search> q{i} </search>", Obs(f"val={val} documents of {i}"),
                                                    f"<refine>ref {i}.{k}</refine>\n<answer> x </answer>"])


def test_ig_is_real_minus_mean_random_with_a_fake_scorer():
    trajectories = [_question(i, k, 10 * i + k) for i in range(4) for k in range(2)]
    groups = [i for i in range(4) for _ in range(2)]
    config = ig.IGConfig(n_random=3)
    scorer = ValueScorer()
    result = ig.compute_info_gain(scorer, None, trajectories, ["x"] * 8, BYTES, config, group_ids=groups, step=5)
    # Recompute from the plan (same seed and step): real -v/10, randoms -v_j/10 of their source steps.
    rollouts = [ig.rollout_steps(t, BYTES, config) for t in trajectories]
    plan, _ = ig.plan_sequences(rollouts, ["x"] * 8, config, np.random.default_rng([config.seed, 5]), groups)
    for r in range(8):
        sources = [s.source[0] for s in plan if s.trajectory == r and s.kind == ig.RANDOM]
        assert len(sources) == 3 and all(groups[s] != groups[r] for s in sources)
        value = 10 * (r // 2) + r % 2
        expected = -value / 10 + np.mean([(10 * (s // 2) + s % 2) / 10 for s in sources])
        assert result.step_igs[r] == [pytest.approx(expected)] and result.step_indices[r] == [0]
        assert result.step_real_scores[r] == [pytest.approx(-value / 10)]
        assert result.step_real_scores[r][0] - np.mean(result.step_random_scores[r][0]) == pytest.approx(expected)
    assert scorer.calls == 1 and result.diagnostics["ig/n_sequences"] == 32
    assert result.diagnostics["ig/pool_size"] == 8 and result.diagnostics["ig/pool_fallback_steps"] == 0
    again = ig.compute_info_gain(ValueScorer(), None, trajectories, ["x"] * 8, BYTES, config, group_ids=groups, step=5)
    assert again.step_igs == result.step_igs  # Deterministic per (seed, step).


class RecordingScorer:
    """Records the (context, answer) ids it is asked to score; every answer token gets log-prob -1."""

    def __init__(self):
        self.contexts, self.answers = [], []

    def __call__(self, params, contexts, answers):
        self.contexts += [list(c) for c in contexts]
        self.answers += [list(a) for a in answers]
        return [np.full(len(a), -1.0, np.float32) for a in answers]


@pytest.mark.parametrize("join", ig.ANSWER_JOINS)
def test_answer_join_decides_where_the_context_ends_and_which_tokens_are_scored(join):
    texts = ["George Washington was born in Virginia.", "Ask George about George Washington, then Ada."] * 30
    tokenizer = train_bpe_tokenizer(texts, vocab_size=320)
    pieces = lambda ids: [tokenizer.decode([i]) for i in ids]  # noqa: E731
    gold = "George Washington"
    trajectories = [make_trajectory(tokenizer, f"Q{i}: who?\n", [f"<search> q{i} </search>",
                                                                   Obs(f"{gold} was born in Virginia {i}."),
                                                                   f"<answer> {gold} </answer>"]) for i in range(2)]
    config = ig.IGConfig(n_random=1, answer_join=join)
    scorer = RecordingScorer()
    result = ig.compute_info_gain(scorer, None, trajectories, [gold, gold], tokenizer, config, group_ids=[0, 1])
    assert result.diagnostics["ig/n_search_steps"] == 2 and len(scorer.answers) == 4
    steps = ig.rollout_steps(trajectories[0], tokenizer, config)
    skeleton = ig.build_context(steps.prefix, steps.blocks, 0)
    real_context = tokenizer.encode(skeleton + config.answer_prefix, add_special_tokens=False)
    if join == "reference":  # Today's layout, exactly: the context ends with "\n<answer> ", the gold on its own.
        assert scorer.contexts[0] == real_context
        assert pieces(scorer.contexts[0][-2:]) == ["<answer>", " "]  # A lone-space token before the gold.
        assert pieces(scorer.answers[0]) == ["George", " Washington"]
        assert config.scored_answer(gold) == gold
    else:  # The context ends at <answer>; the gold is scored as one space-led word token, as a policy writes it.
        assert scorer.contexts[0] == real_context[:-1]
        assert pieces(scorer.contexts[0][-2:]) == ["\n", "<answer>"]
        assert pieces(scorer.answers[0]) == [" George", " Washington"]
        assert config.scoring_context("ctx") == "ctx\n<answer>" and config.scored_answer(gold) == " " + gold
    assert all(a == scorer.answers[0] for a in scorer.answers)  # REAL and RANDOM score the same tokens.


def test_gold_longer_than_the_largest_answer_bucket_is_truncated_and_counted():
    trajectories = [_question(i, k, 10 * i + k) for i in range(2) for k in range(2)]
    config = ig.IGConfig(n_random=1, answer_buckets=(4,))
    lengths = []

    def scorer(params, contexts, answers):
        lengths.extend(len(a) for a in answers)
        return ValueScorer()(params, contexts, answers)

    long_gold = "a much longer gold answer"
    result = ig.compute_info_gain(scorer, None, trajectories, [long_gold] * 4, BYTES, config,
                                  group_ids=[0, 0, 1, 1], step=1)
    assert lengths and max(lengths) == 4
    assert result.diagnostics["ig/answers_truncated"] == len(lengths)
    assert all(len(steps) == 1 for steps in result.step_igs)


def test_batch_without_valid_steps_never_calls_the_model():
    def scorer(*args):
        raise AssertionError("the model must not be called")

    trajectories = [make_trajectory(BYTES, "Q: a?\n", ["<answer> a </answer>"]),
                    make_trajectory(BYTES, "Q: b?\n", ["<search> b </search>", Obs("short"), "<answer> b </answer>"])]
    result = ig.compute_info_gain(scorer, None, trajectories, ["a", "b"], BYTES, ig.IGConfig())
    assert result.step_igs == [[], []] and result.step_indices == [[], []]
    np.testing.assert_array_equal(result.r_ig, [0.0, 0.0])
    assert result.diagnostics["ig/n_search_steps"] == 0 and result.diagnostics["ig/n_sequences"] == 0
    assert all(v == 0.0 for v in result.diagnostics.values())
    np.testing.assert_array_equal(ig.step_ig_token_values(result, trajectories, 64), np.zeros((2, 64)))


def test_step_ig_token_values_on_query_tokens():
    trajectory = make_trajectory(BYTES, "Q: a?\n", ["<search> first </search>", Obs("documents one"),
                                                    "<search> second </search>", Obs("documents two")])
    result = ig.IGResult([[0.5, -2.0], []], [[0, 1], []], np.zeros(2, np.float32), {})
    empty = make_trajectory(BYTES, "Q: b?\n", ["<answer> b </answer>"])
    values = ig.step_ig_token_values(result, [trajectory, empty], len(trajectory.response_ids))
    (a0, b0), (a1, b1) = trajectory.steps[0].query_span, trajectory.steps[1].query_span
    assert BYTES.decode(trajectory.response_ids[a0:b0]) == "first"
    expected = np.zeros((2, len(trajectory.response_ids)), np.float32)
    expected[0, a0:b0], expected[0, a1:b1] = 0.5, -2.0
    np.testing.assert_array_equal(values, expected)
    batch = rollout.pack_trajectories([trajectory, empty], 16, len(trajectory.response_ids), 0)
    np.testing.assert_array_equal(values != 0, batch["query_token_mask"])
    clipped = ig.step_ig_token_values(result, [trajectory, empty], b1 - 2)  # The second span is clipped.
    assert (clipped[0] != 0).sum() == (b0 - a0) + (b1 - 2 - a1)


# ----------------------------------------------------------------------------------------------------------------
# A real tiny Qwen2, trained here to answer with the city its context's refine block names.

NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivan", "Juno", "Kofi", "Lena")
CITIES = ("Paris", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar")  # Added tokens: one token each.
CONTEXT_LEN, ANSWER_LEN = 32, 2
CONFIG = ig.IGConfig(max_context_tokens=CONTEXT_LEN, context_buckets=(16, CONTEXT_LEN), answer_buckets=(ANSWER_LEN, 4),
                     micro_batch_size=4)


def city_trajectory(tokenizer, name, city, documents="{name}: {city}."):
    return make_trajectory(tokenizer, f"{name}?\n", [
        f"<search> {name} </search>", Obs(documents.format(name=name, city=city)),
        f"<refine>{city}</refine>\n<answer> {city} </answer>",
    ])


@pytest.fixture(scope="module")
def world():
    """(tokenizer, model config, params trained for 80 Adam steps on REAL contexts built by the IG pipeline).

    The contexts end with `<refine>{city}</refine>\n<answer> `: the model learns to answer with the city its
    context names, so the gold is likely after the real pair and unlikely after another question's pair.
    """
    pairs = [(n, c) for n in NAMES for c in CITIES]
    corpus = [f"{n}? <search> {n} </search> {n}: {c}." for n, c in pairs]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=300, extra_tokens=AGENT_TAGS + CITIES)
    model_config = qwen2.Qwen2Config.tiny(vocab_size=len(tokenizer))
    contexts = {}
    for name, city in pairs:
        steps = ig.rollout_steps(city_trajectory(tokenizer, name, city), tokenizer, CONFIG)
        text = ig.build_context(steps.prefix, steps.blocks, 0) + CONFIG.answer_prefix
        contexts[name, city] = tokenizer.encode(text, add_special_tokens=False)
    score_fn = ig.qwen2_score_fn(model_config)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def train_step(params, opt_state, tokens, mask):
        def loss_fn(p):
            answer_mask = mask[:, -ANSWER_LEN:]
            return -(score_fn(p, tokens, mask, num_scored=ANSWER_LEN) * answer_mask).sum() / answer_mask.sum()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = nn.unbox(qwen2.init_params(model_config, jax.random.PRNGKey(0)))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    for _ in range(80):
        batch = [pairs[i] for i in rng.integers(len(pairs), size=16)]
        tokens, mask = ig.pack_sequences([contexts[p] for p in batch],
                                         [tokenizer.encode(c, add_special_tokens=False) for _, c in batch],
                                         16, CONTEXT_LEN, ANSWER_LEN)
        params, opt_state, loss = train_step(params, opt_state, tokens, mask)
    assert float(loss) < 0.1, float(loss)
    return tokenizer, model_config, params


@pytest.fixture(scope="module")
def scorer(world):
    return ig.SequenceScorer(ig.qwen2_score_fn(world[1]), CONFIG)


def test_ig_is_positive_when_only_the_real_documents_hold_the_answer(world, scorer):
    tokenizer, _, params = world
    names = np.random.default_rng(1).permutation(NAMES)[:6]
    # Two rollouts per question; the siblings' documents differ in wording but name the same city.
    trajectories = [city_trajectory(tokenizer, name, city, documents)
                    for name, city in zip(names, CITIES, strict=True)
                    for documents in ("{name}: {city}.", "{name} is in {city}.")]
    groups = [i // 2 for i in range(12)]
    golds = [{"target": [CITIES[i // 2]]} for i in range(12)]
    result = ig.compute_info_gain(scorer, params, trajectories, golds, tokenizer, CONFIG, group_ids=groups, step=3)
    d = result.diagnostics
    assert d["ig/n_search_steps"] == 12 and d["ig/n_sequences"] == 48 and d["ig/positive_ig_ratio"] == 1.0
    assert min(x for igs in result.step_igs for x in igs) > 2.0, result.step_igs
    assert d["ig/logp_real_mean"] > -1.0 and d["ig/logp_baseline_mean"] < -3.0, d
    np.testing.assert_allclose(result.r_ig, [igs[0] for igs in result.step_igs], rtol=1e-6)
    assert result.step_indices == [[0]] * 12

    # The reference's pool (siblings allowed): a step that draws its sibling's pair loses part of its IG.
    mixed_config = dataclasses.replace(CONFIG, exclude_same_question=False)
    mixed = ig.compute_info_gain(scorer, params, trajectories, golds, tokenizer, mixed_config, group_ids=groups,
                                 step=3)
    rollouts = [ig.rollout_steps(t, tokenizer, mixed_config) for t in trajectories]
    plan, _ = ig.plan_sequences(rollouts, golds, mixed_config, np.random.default_rng([0, 3]), groups)
    sibling_draws = {s.trajectory for s in plan if s.kind == ig.RANDOM and groups[s.source[0]] == groups[s.trajectory]}
    assert sibling_draws
    drop = np.mean([result.step_igs[r][0] - mixed.step_igs[r][0] for r in sibling_draws])
    assert drop > 1.0, (result.step_igs, mixed.step_igs)
    assert all(mixed.step_igs[r][0] > 2.0 for r in range(12) if r not in sibling_draws)


def _reference_logprobs(model_config, params, contexts, answers):
    """Answer-token log-probs from one plain forward: RIGHT-padded rows at positions 0.. (causal attention never
    sees the padding), float64 log-softmax; independent of the scorer's left-padded, bucketed layout."""
    rows = [list(c) + list(a) for c, a in zip(contexts, answers, strict=True)]
    width = max(len(r) for r in rows)
    ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
    mask = np.array([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
    logits, _ = jax.jit(qwen2.Qwen2LM(model_config).apply)({"params": params}, ids, positions, mask)
    logprobs = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return [np.array([logprobs[b, len(c) - 1 + k, t] for k, t in enumerate(a)])
            for b, (c, a) in enumerate(zip(contexts, answers, strict=True))]


def _sequences(world, lengths):
    tokenizer, _, _ = world
    rng = np.random.default_rng([n for pair in lengths for n in pair])
    vocab = len(tokenizer)
    contexts = [rng.integers(2, vocab, size=n).tolist() for n, _ in lengths]
    answers = [rng.integers(2, vocab, size=a).tolist() for _, a in lengths]
    return contexts, answers


def test_scorer_matches_unpadded_forward_and_programs_stay_bounded(world, scorer):
    _, model_config, params = world
    # Buckets (context, answer): (16, 2) x 3, (32, 4) x 2, (32, 2) x 4, and two empty answers (not sent).
    lengths = [(5, 1), (16, 2), (17, 3), (30, 1), (32, 4), (3, 0), (9, 2), (20, 2), (25, 2), (31, 1), (20, 0)]
    contexts, answers = _sequences(world, lengths)
    out = scorer(params, contexts, answers)
    reference = _reference_logprobs(model_config, params, contexts, answers)
    for answer, logprobs, expected in zip(answers, out, reference, strict=True):
        assert logprobs.shape == (len(answer),)
        np.testing.assert_allclose(logprobs, expected, atol=2e-5)
    programs = scorer.compiled_programs()
    bound = 3 * len(CONFIG.context_buckets) * len(CONFIG.answer_buckets)  # Row buckets 1, 2, 4.
    assert 0 < programs <= bound
    # Different contents and counts, the same buckets: nothing recompiles.
    contexts, answers = _sequences(world, [(7, 2), (15, 1), (2, 2), (11, 2), (18, 3), (29, 4), (30, 1), (22, 2),
                                           (27, 1)])
    scorer(params, contexts, answers)
    assert scorer.compiled_programs() == programs
    with pytest.raises(ValueError, match="IG context length"):
        scorer(params, [[3] * (CONTEXT_LEN + 1)], [[4]])


def test_sharded_scoring_equals_single_device(world, scorer):
    _, model_config, params = world
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(functools.partial(qwen2.init_params, model_config), jax.random.PRNGKey(0))
    sharded_params = sharding.shard_params(params, sharding.logical_shardings(abstract, mesh))
    assert sharded_params["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.P("fsdp", "tensor")
    sharded = ig.SequenceScorer(ig.qwen2_score_fn(model_config), CONFIG, mesh=mesh)
    contexts, answers = _sequences(world, [(6, 2), (20, 1), (32, 2), (27, 2), (9, 1), (24, 2)])
    single = scorer(params, contexts, answers)
    for a, b in zip(sharded(sharded_params, contexts, answers), single, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
