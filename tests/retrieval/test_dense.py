"""Dense retrieval: exact top-k vs numpy, sharded == unsharded, bounded compiles, MiniLM on a tiny corpus."""

import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

from jax_hd.core import sharding
from jax_hd.models import bert, hf_import
from jax_hd.retrieval import Passage, Retriever
from jax_hd.retrieval.bm25 import Corpus
from jax_hd.retrieval.dense import DenseIndex, Encoder, EncoderConfig

NUM_PASSAGES, DIM = 1000, 24


@pytest.fixture(scope="module")
def random_index_data():
    rng = np.random.RandomState(0)
    embeddings = rng.randn(NUM_PASSAGES, DIM).astype(np.float32)
    queries = rng.randn(13, DIM).astype(np.float32)
    ids = [f"doc{i}" for i in range(NUM_PASSAGES)]
    return embeddings, queries, ids


def _numpy_top_k(embeddings, queries, k):
    scores = queries.astype(np.float64) @ embeddings.T.astype(np.float64)
    indices = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, indices, axis=1), indices


def test_top_k_equals_exhaustive_numpy(random_index_data):
    embeddings, queries, ids = random_index_data
    index = DenseIndex(embeddings, ids, ids, chunk_size=96)  # 11 chunks, the last one partly padding
    assert index.chunk == 96 and index.rows_per_shard == 1056
    expected_scores, expected_indices = _numpy_top_k(embeddings, queries, 10)
    scores, indices = index.search_embeddings(queries, 10)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5, rtol=0)
    # More than the corpus: every passage, in score order.
    scores, indices = index.search_embeddings(queries[:2], NUM_PASSAGES + 5)
    np.testing.assert_array_equal(indices, _numpy_top_k(embeddings, queries[:2], NUM_PASSAGES)[1])


@pytest.mark.parametrize("axes", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}], ids=["data8", "2x2x2"])
def test_sharded_index_equals_unsharded(random_index_data, axes):
    embeddings, queries, ids = random_index_data
    mesh = sharding.make_mesh(axes)
    sharded = DenseIndex(embeddings, ids, ids, mesh=mesh, chunk_size=32)
    unsharded = DenseIndex(embeddings, ids, ids, chunk_size=32)
    assert sharded.num_shards == 8 and sharded.rows_per_shard == 128
    assert len(sharded.device_embeddings.addressable_shards) == 8
    assert {s.data.shape for s in sharded.device_embeddings.addressable_shards} == {(128, DIM)}
    s_scores, s_indices = sharded.search_embeddings(queries, 7)
    u_scores, u_indices = unsharded.search_embeddings(queries, 7)
    np.testing.assert_array_equal(s_indices, u_indices)
    np.testing.assert_array_equal(s_scores, u_scores)
    np.testing.assert_array_equal(u_indices, _numpy_top_k(embeddings, queries, 7)[1])
    # Ties (every passage repeated 100 times) go to the lower index in both.
    tied = np.repeat(embeddings[:10], 100, axis=0)
    tied_sharded = DenseIndex(tied, ids, ids, mesh=mesh, chunk_size=32).search_embeddings(queries, 5)[1]
    tied_unsharded = DenseIndex(tied, ids, ids, chunk_size=32).search_embeddings(queries, 5)[1]
    np.testing.assert_array_equal(tied_sharded, tied_unsharded)
    best = np.argmax(queries @ embeddings[:10].T, axis=1) * 100
    np.testing.assert_array_equal(tied_sharded, best[:, None] + np.arange(5))


def test_query_buckets_bound_search_programs(random_index_data):
    embeddings, queries, ids = random_index_data
    index = DenseIndex(embeddings, ids, ids, query_buckets=(1, 8))
    for n in (1, 3, 8, 13):  # 13 queries run as 8 + 5
        index.search_embeddings(np.tile(queries, (2, 1))[:n], 3)
    assert index.compiled_programs() == 2


@pytest.fixture(scope="module")
def minilm_parts():
    try:
        path = bert.minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    config, params = hf_import.load_bert(path)
    return path, config, params, hf_import.load_tokenizer(path)


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.RandomState(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jumping frogs".split()
    return [" ".join(rng.choice(words, size=rng.randint(1, 14))) for _ in range(n)]


def _random_params(config: bert.BertConfig, seed: int = 0):
    """Random params drawn on the host (compiling the random init takes seconds on CPU)."""
    rng = np.random.RandomState(seed)
    abstract = nn.unbox(jax.eval_shape(functools.partial(bert.init_params, config), jax.random.key(0)))
    return jax.tree.map(lambda x: (rng.randn(*x.shape) * 0.1).astype(np.float32), abstract)


def test_bucketing_compiles_a_bounded_number_of_programs(minilm_parts):
    """A random tiny BERT with the MiniLM tokenizer: 2 batch x 2 length buckets bound the programs."""
    _, _, _, tokenizer = minilm_parts
    model_config = bert.BertConfig.tiny(vocab_size=tokenizer.vocab_size)
    params = _random_params(model_config)
    config = EncoderConfig(max_length=16, batch_buckets=(2, 4), length_buckets=(8, 32))
    assert config.lengths == (8, 16)
    encoder = Encoder(model_config, params, tokenizer, config)
    texts = _texts(23, seed=0)
    embeddings = encoder.encode(texts)
    assert embeddings.shape == (23, model_config.hidden_size) and embeddings.dtype == np.float32
    assert 1 < encoder.compiled_programs() <= 4
    encoder.encode(_texts(31, seed=1))
    assert encoder.compiled_programs() <= 4
    # Padding to a bucket and batching with other texts do not change a text's embedding.
    alone = np.concatenate([encoder.encode([t]) for t in texts[:5]])
    np.testing.assert_allclose(embeddings[:5], alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)

    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    with pytest.raises(ValueError, match=r"batch buckets \[2, 4\] are not divisible"):
        Encoder(model_config, params, tokenizer, config, mesh=mesh)
    sharded_config = EncoderConfig(max_length=16, batch_buckets=(8,), length_buckets=(8,))
    sharded = Encoder(model_config, params, tokenizer, sharded_config, mesh=mesh)
    np.testing.assert_allclose(sharded.encode(texts), embeddings, atol=1e-5, rtol=0)


CORPUS = Corpus(
    ids=("p0", "p1", "p2", "p3", "p4", "p5"),
    contents=(
        '"Photosynthesis"\nPhotosynthesis is the process by which green plants use sunlight to make sugar.',
        '"Eiffel Tower"\nThe Eiffel Tower is a wrought-iron lattice tower in Paris, France.',
        '"Python (programming language)"\nPython is a high-level programming language created by Guido van Rossum.',
        '"Mount Everest"\nMount Everest is the highest mountain on Earth, in the Himalayas.',
        '"Basketball"\nBasketball is a team sport played by two teams of five players on a court.',
        '"Insulin"\nInsulin is a hormone made by the pancreas that regulates blood sugar.',
    ),
)
QUERIES = {
    "How do plants turn light into food?": "p0",
    "famous landmark in the French capital": "p1",
    "who invented the python language": "p2",
    "what is the tallest peak in the world": "p3",
    "hormone that controls glucose levels": "p5",
}


def test_minilm_retrieves_the_relevant_passage(minilm_parts, tmp_path):
    path, config, params, tokenizer = minilm_parts
    pipeline = hf_import.read_sentence_pipeline(path)
    encoder = Encoder(config, params, tokenizer, EncoderConfig(**pipeline))
    index = DenseIndex.build(encoder, CORPUS)
    retriever: Retriever = index  # the protocol (not runtime-checkable): search(queries, topk)
    results = retriever.search(list(QUERIES), topk=2)
    assert [r[0].id for r in results] == list(QUERIES.values())
    assert all(isinstance(p, Passage) and len(r) == 2 and r[0].score >= r[1].score for r in results for p in r)
    assert results[1][0].contents == CORPUS.contents[1]
    # Cosine similarity of normalised embeddings.
    query_embedding = encoder.encode_queries(list(QUERIES)[:1])[0]
    np.testing.assert_allclose(results[0][0].score, index.embeddings[0] @ query_embedding, atol=1e-5)

    index.save(str(tmp_path))
    loaded = DenseIndex.load(str(tmp_path), encoder=encoder, mesh=sharding.make_mesh({"data": 8}))
    assert loaded.search(list(QUERIES), topk=2) == results
