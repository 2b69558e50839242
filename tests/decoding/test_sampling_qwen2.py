"""The sampler driving the real Qwen2 model: HF parity of greedy decoding, and sharded = single device."""

import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

from jax_hd.core import sharding
from jax_hd.decoding import sampling
from jax_hd.models import hf_import, qwen2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = qwen2.Qwen2Config.tiny(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
SAMPLER_CONFIG = sampling.SamplerConfig(prompt_buckets=(16,), new_token_buckets=(16,), pad_id=0)
PROMPTS = [[5, 17, 33, 2, 8, 61, 9], [40, 41], [7, 3, 88, 12, 19]]


def _apply(params, tokens, positions, mask, cache):
    return qwen2.Qwen2LM(CONFIG).apply({"params": params}, tokens, positions, mask, cache)


@pytest.fixture(scope="module")
def params():
    return nn.unbox(qwen2.init_params(CONFIG, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def greedy(params):
    sampler = sampling.Sampler(_apply, functools.partial(qwen2.init_cache, CONFIG), SAMPLER_CONFIG)
    return sampler.generate(params, PROMPTS, max_new_tokens=12, rng=jax.random.PRNGKey(0))


def test_greedy_equals_hf_generate_token_for_token(params, greedy, tmp_path):
    hf_import.save_qwen2(str(tmp_path), CONFIG, params)
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(greedy.tokens[:, :12], out[:, width:].numpy())
    # The reported log-probs are the model's: recompute them with a full forward in HF.
    with torch.no_grad():
        logits = model(out, attention_mask=torch.ones_like(out) * torch.cat([mask, torch.ones(3, 12, dtype=int)], 1),
                       position_ids=(torch.cat([mask, torch.ones(3, 12, dtype=int)], 1).cumsum(-1) - 1).clamp(min=0)
                       ).logits
    logprobs = torch.log_softmax(logits[:, width - 1 : -1], -1).gather(-1, out[:, width:, None])[..., 0].numpy()
    np.testing.assert_allclose(greedy.logprobs[:, :12], logprobs, atol=1e-4)


def test_sharded_sampler_matches_single_device(params, greedy):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(functools.partial(qwen2.init_params, CONFIG), jax.random.PRNGKey(0))
    sharded_params = sharding.shard_params(params, sharding.logical_shardings(abstract, mesh))
    assert sharded_params["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec == jax.P("fsdp", "tensor")
    sampler = sampling.Sampler(_apply, functools.partial(qwen2.init_cache, CONFIG), SAMPLER_CONFIG, mesh=mesh)
    out = sampler.generate(sharded_params, PROMPTS, max_new_tokens=12, rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_array_equal(out.lengths, greedy.lengths)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-5)
    sampled = [sampler.generate(sharded_params, PROMPTS, max_new_tokens=12, rng=jax.random.PRNGKey(7),
                                temperature=1.0, top_p=0.9)]
    single = sampling.Sampler(_apply, functools.partial(qwen2.init_cache, CONFIG), SAMPLER_CONFIG)
    sampled.append(single.generate(params, PROMPTS, max_new_tokens=12, rng=jax.random.PRNGKey(7), temperature=1.0,
                                   top_p=0.9))
    np.testing.assert_array_equal(sampled[0].tokens, sampled[1].tokens)
