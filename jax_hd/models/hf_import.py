"""HF safetensors checkpoints <-> Flax params, for every model in `jax_hd.models`.

Generic part: each Flax leaf corresponds to one HF tensor through a `TensorMap`,
`flax = hf.transpose(perm).reshape(flax_shape)` (a transpose, then splitting axes, e.g. `heads * head_dim`
into `[heads, head_dim]`). From that one description we derive the expected HF shapes (validation), the HF
slice behind any Flax slice (sharded loading: each host reads only what its devices hold), and the inverse
for saving. A model adds a `*_tensor_maps(config)` table and thin `load_*` / `save_*` wrappers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util
from jax.experimental import multihost_utils

from jax_hd.models import bart, bert, qformer, qwen2, vit

Path = tuple[str, ...]  # a Flax leaf's key path, e.g. ("layers_0", "self_attn", "q_proj", "kernel")
Index = tuple[slice, ...]
CONFIG_FILE = "config.json"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # HF's default "5GB"


# ----------------------------------------------------------------------------------------------------------
# Generic: one Flax leaf <-> one HF tensor.


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """`flax = hf.transpose(perm).reshape(flax_shape)`.

    perm: axis permutation applied to the HF tensor (`()`: identity).
    groups: how many consecutive Flax axes each (permuted) HF axis splits into (`()`: one each), e.g.
      `(1, 2)` for `[hidden, heads * head_dim] -> [hidden, heads, head_dim]`.
    """

    hf_name: str
    perm: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()

    def _groups(self, flax_rank: int) -> tuple[int, ...]:
        groups = self.groups or (1,) * flax_rank
        if sum(groups) != flax_rank:
            raise ValueError(f"{self.hf_name}: groups {groups} do not cover a rank-{flax_rank} Flax array")
        return groups

    def _perm(self, hf_rank: int) -> tuple[int, ...]:
        return self.perm or tuple(range(hf_rank))

    def _grouped(self, flax_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Flax axes split per group: `[hidden, heads, head_dim]`, groups (1, 2) -> [(hidden,), (heads, hd)]."""
        out, start = [], 0
        for g in self._groups(len(flax_shape)):
            out.append(tuple(flax_shape[start : start + g]))
            start += g
        return out

    def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape that maps to `flax_shape`."""
        permuted = [math.prod(g) for g in self._grouped(flax_shape)]
        perm = self._perm(len(permuted))
        hf = [0] * len(permuted)
        for i, p in enumerate(perm):
            hf[p] = permuted[i]
        return tuple(hf)

    def to_flax(self, hf: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
        return np.transpose(hf, self._perm(hf.ndim)).reshape(flax_shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        permuted = [math.prod(g) for g in self._grouped(x.shape)]
        return np.transpose(x.reshape(permuted), np.argsort(self._perm(len(permuted))))

    def read(self, hf_slice: Any, flax_shape: tuple[int, ...], index: Index) -> np.ndarray:
        """Reads the Flax slice `index` from `hf_slice` (`hf_slice[hf_index]` reads an HF sub-array).

        A group's leading axis maps to a contiguous HF range; its inner axes are read whole and sliced
        after the reshape (they are `kv`/`head_dim`, which no rule shards).
        """
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, flax_shape, strict=True))
        permuted_index, read_shape, rest, axis = [], [], [], 0
        for group in self._grouped(flax_shape):
            lead = index[axis]
            inner = math.prod(group[1:])
            permuted_index.append(slice(lead.start * inner, lead.stop * inner))
            read_shape += [lead.stop - lead.start, *group[1:]]
            rest += [slice(None), *index[axis + 1 : axis + len(group)]]
            axis += len(group)
        perm = self._perm(len(permuted_index))
        hf_index = [slice(None)] * len(perm)
        for i, p in enumerate(perm):
            hf_index[p] = permuted_index[i]
        x = np.transpose(hf_slice[tuple(hf_index)], perm).reshape(read_shape)
        return x[tuple(rest)]


class SafetensorsDir(contextlib.AbstractContextManager):
    """Read access to the tensors of a HF checkpoint directory (one file, or shards + index)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, SAFETENSORS_INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
        else:
            paths = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
            if not paths:
                raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
            self._files = {}
            for path in paths:
                with safetensors.safe_open(path, framework="numpy") as f:
                    self._files.update({name: path for name in f.keys()})
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}

    def _handle(self, name: str) -> Any:
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safetensors.safe_open(path, framework="numpy"))
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def get_slice(self, name: str) -> Any:
        """Lazily sliceable tensor: `get_slice(name)[1:3, :]` reads only those rows."""
        return self._handle(name).get_slice(name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_tensors(
    reader: SafetensorsDir,
    maps: Mapping[Path, TensorMap],
    flax_shapes: Mapping[Path, tuple[int, ...]],
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Raises ValueError naming every missing, wrongly-shaped or unexpected HF tensor."""
    problems = []
    expected = {m.hf_name: m.hf_shape(flax_shapes[path]) for path, m in maps.items()}
    present = set(reader.names())
    for name, shape in expected.items():
        if name not in present:
            problems.append(f"missing tensor {name} (expected shape {shape})")
        elif reader.shape(name) != shape:
            problems.append(f"tensor {name} has shape {reader.shape(name)}, expected {shape}")
    unexpected = sorted(n for n in present - set(expected) if not ignore(n))
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if problems:
        raise ValueError(f"checkpoint {reader.hf_dir} does not match the model config:\n  " + "\n  ".join(problems))


def read_tensors(
    reader: SafetensorsDir,
    maps: Mapping[Path, TensorMap],
    flax_shapes: Mapping[Path, tuple[int, ...]],
    dtype: Any,
    shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
) -> dict[Path, jax.Array]:
    """Flax leaves by path: whole tensors on the default device, or assembled per device with `shardings`."""
    out = {}
    for path, m in maps.items():
        shape = flax_shapes[path]
        if shardings is None:
            out[path] = jnp.asarray(m.to_flax(reader.get(m.hf_name), shape).astype(dtype))
        else:
            out[path] = _read_sharded(reader, m, shape, dtype, shardings[path])
    return out


def _read_sharded(
    reader: SafetensorsDir, m: TensorMap, shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding
) -> jax.Array:
    """One global array; this host reads only its devices' slices, each distinct slice once."""
    slices: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def callback(index: Index) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        if key not in slices:
            slices[key] = m.read(reader.get_slice(m.hf_name), shape, index).astype(dtype)
        return slices[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def _to_host(x: Any) -> np.ndarray:
    """A whole (possibly sharded, possibly multi-host) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def write_safetensors(
    hf_dir: str,
    tensors: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]],
    dtype: Any,
    max_shard_bytes: int,
) -> None:
    """Writes `{hf_name: (shape, fetch)}` as `model.safetensors` or HF-style shards + index.

    `fetch()` is called in every process (it may be a collective); only process 0 writes. Stale
    `model*.safetensors` files and index in `hf_dir` are removed first.
    """
    itemsize = jnp.dtype(dtype).itemsize
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, (shape, _) in tensors.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    writer = jax.process_index() == 0
    if writer:
        stale = glob.glob(os.path.join(hf_dir, "model*.safetensors")) + [os.path.join(hf_dir, SAFETENSORS_INDEX_FILE)]
        for path in stale:
            if os.path.exists(path):
                os.remove(path)
    weight_map = {}
    for i, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {name: np.ascontiguousarray(tensors[name][1]().astype(dtype)) for name in names}
        if writer:
            safetensors.numpy.save_file(arrays, os.path.join(hf_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    if writer and len(shards) > 1:
        total = sum(math.prod(shape) * itemsize for shape, _ in tensors.values())
        with open(os.path.join(hf_dir, SAFETENSORS_INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _unwrap(tree: Any) -> Any:
    """Accepts `{"params": tree}` or the tree itself."""
    return tree["params"] if isinstance(tree, Mapping) and set(tree) == {"params"} else tree


def _flat(tree: Any) -> dict[Path, Any]:
    return traverse_util.flatten_dict(_unwrap(tree))


def _check_same_paths(what: str, got: Mapping[Path, Any], expected: Mapping[Path, Any]) -> None:
    if set(got) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) - set(got))
        extra = sorted("/".join(p) for p in set(got) - set(expected))
        raise ValueError(f"{what} does not match the model's params: missing {missing}, unexpected {extra}")


def _checked_flat(params: Any, shapes: Mapping[Path, tuple[int, ...]]) -> dict[Path, Any]:
    """`params` (possibly boxed) flattened by path, checked to have exactly the paths and shapes of `shapes`."""
    flat = _flat(nn.unbox(params))
    _check_same_paths("params", flat, shapes)
    for path, shape in shapes.items():
        if tuple(flat[path].shape) != shape:
            raise ValueError(f"param {'/'.join(path)} has shape {flat[path].shape}, config expects {shape}")
    return flat


def _model_tensors(
    params: Any, maps: Mapping[Path, TensorMap], shapes: Mapping[Path, tuple[int, ...]]
) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """`{hf_name: (shape, fetch)}` for `write_safetensors`, one HF tensor per Flax leaf."""
    flat = _checked_flat(params, shapes)
    return {
        m.hf_name: (m.hf_shape(shapes[path]), functools.partial(lambda m, x: m.to_hf(_to_host(x)), m, flat[path]))
        for path, m in maps.items()
    }


def write_checkpoint(
    hf_dir: str,
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]],
    dtype: Any,
    max_shard_bytes: int,
) -> None:
    """config.json (process 0) + safetensors shards of an HF checkpoint; call on every process."""
    if jax.process_index() == 0:
        os.makedirs(hf_dir, exist_ok=True)
        with open(os.path.join(hf_dir, CONFIG_FILE), "w") as f:
            json.dump(dict(hf_config), f, indent=2)
    write_safetensors(hf_dir, tensors, dtype, max_shard_bytes)


def _dtype_from_hf(d: Mapping[str, Any]) -> Any:
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    return jnp.dtype(str(name).removeprefix("torch."))


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# Qwen2.


def qwen2_tensor_maps(config: qwen2.Qwen2Config) -> dict[Path, TensorMap]:
    """Flax path -> HF tensor for `Qwen2ForCausalLM` (see `qwen2.py` for the Flax layouts)."""
    transpose = (1, 0)
    maps = {("embed_tokens", "embedding"): TensorMap("model.embed_tokens.weight")}
    for i in range(config.num_hidden_layers):
        flax_layer, hf_layer = f"layers_{i}", f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            hf = f"{hf_layer}.self_attn.{proj}"
            maps[(flax_layer, "self_attn", proj, "kernel")] = TensorMap(f"{hf}.weight", transpose, (1, 2))
            maps[(flax_layer, "self_attn", proj, "bias")] = TensorMap(f"{hf}.bias", (), (2,))
        maps[(flax_layer, "self_attn", "o_proj", "kernel")] = TensorMap(
            f"{hf_layer}.self_attn.o_proj.weight", transpose, (2, 1)
        )
        for proj in ("gate_proj", "up_proj", "down_proj"):
            maps[(flax_layer, "mlp", proj, "kernel")] = TensorMap(f"{hf_layer}.mlp.{proj}.weight", transpose)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            maps[(flax_layer, norm, "scale")] = TensorMap(f"{hf_layer}.{norm}.weight")
    maps[("norm", "scale")] = TensorMap("model.norm.weight")
    if not config.tie_word_embeddings:
        maps[("lm_head",)] = TensorMap("lm_head.weight", transpose)
    return maps


def qwen2_param_shapes(config: qwen2.Qwen2Config) -> dict[Path, tuple[int, ...]]:
    """Flax param shapes by path, from an abstract init (no memory)."""
    abstract = jax.eval_shape(functools.partial(qwen2.init_params, config), jax.random.key(0))
    return {path: tuple(x.shape) for path, x in _flat(nn.unbox(abstract)).items()}


def _qwen2_ignored(config: qwen2.Qwen2Config) -> Callable[[str], bool]:
    def ignore(name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")

    return ignore


def read_qwen2_config(hf_dir: str, **overrides: Any) -> qwen2.Qwen2Config:
    """`Qwen2Config` from `hf_dir/config.json`; `overrides` set JAX-side fields (dtype, param_dtype, remat)."""
    return qwen2.Qwen2Config.from_hf_dict(_read_json(os.path.join(hf_dir, CONFIG_FILE)), **overrides)


def load_qwen2(
    hf_dir: str, *, dtype: Any = None, shardings: Any = None, **config_overrides: Any
) -> tuple[qwen2.Qwen2Config, dict[str, Any]]:
    """Reads a HF Qwen2 checkpoint directory (config.json + safetensors) into Flax params.

    Args:
      hf_dir: directory with `config.json` and `model.safetensors` or shards + `model.safetensors.index.json`.
      dtype: dtype of the loaded params (default: the checkpoint's `torch_dtype`); becomes `param_dtype`.
      shardings: optional tree of `jax.sharding.Sharding` matching the params, e.g.
        `sharding.logical_shardings(jax.eval_shape(functools.partial(qwen2.init_params, config), rng), mesh)`.
        Each tensor is then assembled with `jax.make_array_from_callback`, reading only local slices.
      **config_overrides: JAX-side `Qwen2Config` fields, e.g. `dtype=jnp.bfloat16` (activations), `remat=True`.
    Returns:
      `(config, params)`, params the `"params"` collection of `qwen2.Qwen2LM` (plain nested dict).
    Raises:
      ValueError naming each missing, wrongly-shaped or unexpected tensor.
    """
    if "param_dtype" in config_overrides:
        raise TypeError("load_qwen2: pass the params' dtype as dtype=, not param_dtype=")
    hf_config = _read_json(os.path.join(hf_dir, CONFIG_FILE))
    dtype = jnp.dtype(dtype or _dtype_from_hf(hf_config))
    config = qwen2.Qwen2Config.from_hf_dict(hf_config, param_dtype=dtype, **config_overrides)
    maps, shapes = qwen2_tensor_maps(config), qwen2_param_shapes(config)
    _check_same_paths("qwen2_tensor_maps", maps, shapes)
    flat_shardings = None
    if shardings is not None:
        flat_shardings = _flat(shardings)
        _check_same_paths("shardings", flat_shardings, shapes)
    with SafetensorsDir(hf_dir) as reader:
        check_tensors(reader, maps, shapes, ignore=_qwen2_ignored(config))
        flat = read_tensors(reader, maps, shapes, dtype, flat_shardings)
    return config, traverse_util.unflatten_dict(flat)


def save_qwen2(
    hf_dir: str,
    config: qwen2.Qwen2Config,
    params: Any,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes `params` (possibly sharded, boxed, or under a `"params"` key) as a HF Qwen2 checkpoint.

    `dtype`: tensor dtype on disk (default `config.param_dtype`). Call it on every process; process 0 writes.
    The result loads with `transformers.Qwen2ForCausalLM.from_pretrained(hf_dir)`.
    """
    dtype = jnp.dtype(dtype or config.param_dtype)
    tensors = _model_tensors(params, qwen2_tensor_maps(config), qwen2_param_shapes(config))
    write_checkpoint(hf_dir, config.to_hf_dict(torch_dtype=dtype), tensors, dtype, max_shard_bytes)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers.


def load_tokenizer(hf_dir: str) -> Any:
    """`transformers.AutoTokenizer` from a local directory (never the hub)."""
    import transformers  # heavy; only needed here

    return transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)


# ----------------------------------------------------------------------------------------------------------
# BERT (all-MiniLM-L6-v2, E5, BGE): `transformers.BertModel` checkpoints, bare or `bert.`-prefixed keys.

SENTENCE_MODULES_FILE = "modules.json"  # sentence-transformers pipeline description


@dataclasses.dataclass(frozen=True)
class BertLayout:
    """How a BERT checkpoint names its tensors.

    prefix: `""` (`BertModel.save_pretrained`, sentence-transformers, E5, BGE) or `"bert."`
      (`BertForPreTraining`, `BertForMaskedLM`, ...; their heads are ignored).
    norm_names: LayerNorm `(scale, bias)` suffixes: `("weight", "bias")`, or `("gamma", "beta")` in old exports.
    """

    prefix: str = ""
    norm_names: tuple[str, str] = ("weight", "bias")


def detect_bert_layout(names: list[str], hf_dir: str = "") -> BertLayout:
    """The `BertLayout` of a checkpoint from its tensor names; ValueError when it has no BERT embeddings."""
    names = set(names)
    for prefix in ("", "bert."):
        for norm_names in (("weight", "bias"), ("gamma", "beta")):
            if f"{prefix}embeddings.LayerNorm.{norm_names[0]}" in names:
                return BertLayout(prefix, norm_names)
    for prefix in ("", "bert."):
        if f"{prefix}embeddings.word_embeddings.weight" in names:
            return BertLayout(prefix)
    raise ValueError(
        f"checkpoint {hf_dir} has no BERT embeddings: expected 'embeddings.word_embeddings.weight' or "
        f"'bert.embeddings.word_embeddings.weight' among its {len(names)} tensors"
    )


def bert_tensor_maps(config: bert.BertConfig, layout: BertLayout = BertLayout()) -> dict[Path, TensorMap]:
    """Flax path -> HF tensor for `transformers.BertModel` (see `bert.py` for the Flax layouts)."""
    transpose = (1, 0)
    p = layout.prefix
    scale, bias = layout.norm_names

    def norm(flax_prefix: Path, hf_prefix: str) -> dict[Path, TensorMap]:
        return {
            (*flax_prefix, "scale"): TensorMap(f"{hf_prefix}.LayerNorm.{scale}"),
            (*flax_prefix, "bias"): TensorMap(f"{hf_prefix}.LayerNorm.{bias}"),
        }

    maps = {
        ("embeddings", table, "embedding"): TensorMap(f"{p}embeddings.{table}.weight")
        for table in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    maps.update(norm(("embeddings", "layer_norm"), f"{p}embeddings"))
    for i in range(config.num_hidden_layers):
        flax_layer, hf_layer = f"layer_{i}", f"{p}encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            hf = f"{hf_layer}.attention.self.{proj}"
            maps[(flax_layer, "attention", proj, "kernel")] = TensorMap(f"{hf}.weight", transpose, (1, 2))
            maps[(flax_layer, "attention", proj, "bias")] = TensorMap(f"{hf}.bias", (), (2,))
        hf = f"{hf_layer}.attention.output"
        maps[(flax_layer, "attention", "output", "kernel")] = TensorMap(f"{hf}.dense.weight", transpose, (2, 1))
        maps[(flax_layer, "attention", "output", "bias")] = TensorMap(f"{hf}.dense.bias")
        maps.update(norm((flax_layer, "attention_norm"), hf))
        for flax_name, hf_name in (("intermediate", "intermediate"), ("output", "output")):
            maps[(flax_layer, flax_name, "kernel")] = TensorMap(f"{hf_layer}.{hf_name}.dense.weight", transpose)
            maps[(flax_layer, flax_name, "bias")] = TensorMap(f"{hf_layer}.{hf_name}.dense.bias")
        maps.update(norm((flax_layer, "output_norm"), f"{hf_layer}.output"))
    return maps


def bert_param_shapes(config: bert.BertConfig) -> dict[Path, tuple[int, ...]]:
    """Flax param shapes by path, from an abstract init (no memory)."""
    abstract = jax.eval_shape(functools.partial(bert.init_params, config), jax.random.key(0))
    return {path: tuple(x.shape) for path, x in _flat(nn.unbox(abstract)).items()}


def _bert_ignored(layout: BertLayout) -> Callable[[str], bool]:
    """Tensors the encoder does not use: the pooler, buffers, and task heads outside the `bert.` prefix."""

    def ignore(name: str) -> bool:
        if not name.startswith(layout.prefix):
            return True  # e.g. `cls.predictions.*` next to `bert.*`
        return name.startswith(f"{layout.prefix}pooler.") or name.endswith(("position_ids", "token_type_ids"))

    return ignore


def read_bert_config(hf_dir: str, **overrides: Any) -> bert.BertConfig:
    """`BertConfig` from `hf_dir/config.json`; `overrides` set JAX-side fields (dtype, param_dtype)."""
    return bert.BertConfig.from_hf_dict(_read_json(os.path.join(hf_dir, CONFIG_FILE)), **overrides)


def load_bert(
    hf_dir: str,
    *,
    dtype: Any = None,
    activation_dtype: Any = None,
    shardings: Any = None,
    **config_overrides: Any,
) -> tuple[bert.BertConfig, dict[str, Any]]:
    """Reads a HF BERT checkpoint directory (config.json + safetensors, no torch) into Flax params.

    Works for `BertModel` dirs (all-MiniLM-L6-v2 from `bert.minilm_dir()`, E5, BGE from a local path) and for
    `bert.`-prefixed ones (`BertForMaskedLM`, ...); the pooler and task heads are ignored.

    Args:
      hf_dir: directory with `config.json` and `model.safetensors` or shards + `model.safetensors.index.json`.
      dtype: dtype of the loaded params (default: the checkpoint's `torch_dtype`, else float32); becomes
        `param_dtype`.
      activation_dtype: `BertConfig.dtype` (default float32).
      shardings: optional tree of `jax.sharding.Sharding` matching the params, e.g.
        `sharding.logical_shardings(jax.eval_shape(functools.partial(bert.init_params, config), rng), mesh)`.
      **config_overrides: other `BertConfig` fields.
    Returns:
      `(config, params)`, params the `"params"` collection of `bert.BertEncoder` (plain nested dict).
    Raises:
      ValueError naming each missing, wrongly-shaped or unexpected tensor.
    """
    hf_config = _read_json(os.path.join(hf_dir, CONFIG_FILE))
    dtype = jnp.dtype(dtype or _dtype_from_hf(hf_config))
    if activation_dtype is not None:
        config_overrides["dtype"] = activation_dtype
    config = bert.BertConfig.from_hf_dict(hf_config, **{"param_dtype": dtype, **config_overrides})
    shapes = bert_param_shapes(config)
    flat_shardings = None
    if shardings is not None:
        flat_shardings = _flat(shardings)
        _check_same_paths("shardings", flat_shardings, shapes)
    with SafetensorsDir(hf_dir) as reader:
        layout = detect_bert_layout(reader.names(), hf_dir)
        maps = bert_tensor_maps(config, layout)
        _check_same_paths("bert_tensor_maps", maps, shapes)
        check_tensors(reader, maps, shapes, ignore=_bert_ignored(layout))
        flat = read_tensors(reader, maps, shapes, dtype, flat_shardings)
    return config, traverse_util.unflatten_dict(flat)


def save_bert(
    hf_dir: str,
    config: bert.BertConfig,
    params: Any,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes `params` as a HF `BertModel` checkpoint (bare keys, no pooler); process 0 writes.

    The result loads with `transformers.BertModel.from_pretrained(hf_dir, add_pooling_layer=False)`.
    """
    dtype = jnp.dtype(dtype or config.param_dtype)
    tensors = _model_tensors(params, bert_tensor_maps(config), bert_param_shapes(config))
    write_checkpoint(hf_dir, config.to_hf_dict(torch_dtype=dtype), tensors, dtype, max_shard_bytes)


def read_sentence_pipeline(hf_dir: str) -> dict[str, Any]:
    """Pooling settings of a sentence-transformers dir: `{"pooling", "normalize", "max_length"}`.

    Reads `modules.json` (a `Normalize` module -> normalize=True), the Pooling module's `config.json`
    (mean or CLS) and `sentence_bert_config.json` (`max_seq_length`). Without `modules.json` (a plain
    `BertModel` dir) returns mean pooling, no normalisation, max_length None (the caller decides).
    """
    modules_path = os.path.join(hf_dir, SENTENCE_MODULES_FILE)
    out: dict[str, Any] = {"pooling": "mean", "normalize": False, "max_length": None}
    if not os.path.exists(modules_path):
        return out
    for module in _read_json(modules_path):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Normalize":
            out["normalize"] = True
        elif kind == "Pooling":
            pooling = _read_json(os.path.join(hf_dir, module.get("path", ""), CONFIG_FILE))
            enabled = [k.removeprefix("pooling_mode_") for k, on in pooling.items() if on and k.startswith("pooling_")]
            if enabled not in (["mean_tokens"], ["cls_token"]):
                raise ValueError(f"{hf_dir}: unsupported pooling {enabled} (only one of mean_tokens / cls_token)")
            out["pooling"] = {"cls_token": "cls", "mean_tokens": "mean"}[enabled[0]]
        elif kind not in ("Transformer", ""):
            raise ValueError(f"{modules_path}: sentence-transformers module {module.get('type')!r} is not supported")
    st_config = os.path.join(hf_dir, "sentence_bert_config.json")
    if os.path.exists(st_config):
        out["max_length"] = _read_json(st_config).get("max_seq_length")
    return out


# ----------------------------------------------------------------------------------------------------------
# BLIP-2: vision transformer (`vit.py`) and Q-Former (`qformer.py`).
#
# Sources are HF `Blip2ForImageTextRetrieval` / `Blip2Model` / `Blip2ForConditionalGeneration` checkpoints
# (`vision_model.*`, `query_tokens`, `qformer.*`, and, with the Q-Former's text branch, `embeddings.*`), a
# directory or an in-memory `{name: array}` state dict. Saving writes the `Blip2ForImageTextRetrieval` layout
# (`Salesforce/blip2-itm-vit-g`'s), which has no language model.

Blip2Source = str | os.PathLike | Mapping[str, Any]
BLIP2_VISION_PREFIX = "vision_model."
BLIP2_QFORMER_PREFIX = "qformer."
BLIP2_QUERY_TOKENS = "query_tokens"
BLIP2_TEXT_EMBEDDINGS_PREFIX = "embeddings."
BLIP2_HEADS = ("vision_projection", "text_projection", "itm_head", "language_projection")


@dataclasses.dataclass(frozen=True)
class _LeadingOnesMap(TensorMap):
    """A `TensorMap` whose HF tensor has `ones` extra leading size-1 axes (`query_tokens` `[1, Q, H]` -> `[Q, H]`)."""

    ones: int = 1

    def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (1,) * self.ones + super().hf_shape(flax_shape)

    def to_flax(self, hf: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
        return super().to_flax(hf.reshape(hf.shape[self.ones :]), flax_shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        hf = super().to_hf(x)
        return hf.reshape((1,) * self.ones + hf.shape)

    def read(self, hf_slice: Any, flax_shape: tuple[int, ...], index: Index) -> np.ndarray:
        ones = self.ones

        class Squeezed:
            def __getitem__(self, hf_index: Index) -> np.ndarray:
                x = hf_slice[(slice(0, 1),) * ones + tuple(hf_index)]
                return x.reshape(x.shape[ones:])

        return super().read(Squeezed(), flax_shape, index)


@dataclasses.dataclass(frozen=True)
class _ChunkMap(TensorMap):
    """Chunk `index` of `num` equal chunks of an HF vector: the q or v third of a ViT `qkv.bias`.

    `to_hf` gives the whole vector with zeros outside the chunk; the HF tensor is the sum over its chunks
    (the k third of `qkv.bias` is written as zeros; see `vit.Attention` for why it can be dropped).
    """

    index: int = 0
    num: int = 1

    def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.num * math.prod(flax_shape),)

    def to_flax(self, hf: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
        return np.split(hf, self.num)[self.index].reshape(flax_shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((self.num, x.size), x.dtype)
        out[self.index] = x.reshape(-1)
        return out.reshape(-1)

    def read(self, hf_slice: Any, flax_shape: tuple[int, ...], index: Index) -> np.ndarray:
        return self.to_flax(hf_slice[:], flax_shape)[index]  # a bias vector: read whole


class _StateDictReader(contextlib.AbstractContextManager):
    """`SafetensorsDir`'s read interface over an in-memory `{hf_name: array}` state dict."""

    hf_dir = "<state dict>"

    def __init__(self, tensors: Mapping[str, Any]):
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self._tensors[name]))

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self._tensors[name])

    def get_slice(self, name: str) -> np.ndarray:
        return self.get(name)

    def close(self) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _blip2_reader(source: Blip2Source) -> SafetensorsDir | _StateDictReader:
    return _StateDictReader(source) if isinstance(source, Mapping) else SafetensorsDir(os.fspath(source))


def _blip2_linear(flax_path: Path, hf_name: str, out_groups: int = 1, in_groups: int = 1) -> dict[Path, TensorMap]:
    """A torch `nn.Linear` `weight [out, in]` / `bias [out]` as a Flax kernel `[*in, *out]` / bias `[*out]`."""
    return {
        (*flax_path, "kernel"): TensorMap(f"{hf_name}.weight", (1, 0), (in_groups, out_groups)),
        (*flax_path, "bias"): TensorMap(f"{hf_name}.bias", (), (out_groups,)),
    }


def _blip2_layer_norm(flax_path: Path, hf_name: str) -> dict[Path, TensorMap]:
    return {(*flax_path, "scale"): TensorMap(f"{hf_name}.weight"), (*flax_path, "bias"): TensorMap(f"{hf_name}.bias")}


def blip2_vision_tensor_maps(config: vit.ViTConfig, prefix: str = BLIP2_VISION_PREFIX) -> dict[Path, TensorMap]:
    """Flax path -> HF tensor for `Blip2VisionModel` under `prefix` (see `vit.py` for the Flax layouts)."""
    emb = f"{prefix}embeddings"
    maps: dict[Path, TensorMap] = {
        ("embeddings", "patch_embedding", "kernel"): TensorMap(f"{emb}.patch_embedding.weight", (2, 3, 1, 0)),
        ("embeddings", "patch_embedding", "bias"): TensorMap(f"{emb}.patch_embedding.bias"),
        ("embeddings", "class_embedding"): _LeadingOnesMap(f"{emb}.class_embedding", ones=2),
        ("embeddings", "position_embedding"): _LeadingOnesMap(f"{emb}.position_embedding", ones=1),
    }
    for i in range(config.num_hidden_layers):
        flax_layer, hf_layer = f"layers_{i}", f"{prefix}encoder.layers.{i}"
        attn = f"{hf_layer}.self_attn"
        maps[(flax_layer, "self_attn", "qkv", "kernel")] = TensorMap(f"{attn}.qkv.weight", (1, 0), (1, 3))
        if config.qkv_bias:
            maps[(flax_layer, "self_attn", "q_bias")] = _ChunkMap(f"{attn}.qkv.bias", index=0, num=3)
            maps[(flax_layer, "self_attn", "v_bias")] = _ChunkMap(f"{attn}.qkv.bias", index=2, num=3)
        maps |= _blip2_linear((flax_layer, "self_attn", "projection"), f"{attn}.projection", in_groups=2)
        maps |= _blip2_linear((flax_layer, "mlp", "fc1"), f"{hf_layer}.mlp.fc1")
        maps |= _blip2_linear((flax_layer, "mlp", "fc2"), f"{hf_layer}.mlp.fc2")
        for norm in ("layer_norm1", "layer_norm2"):
            maps |= _blip2_layer_norm((flax_layer, norm), f"{hf_layer}.{norm}")
    maps |= _blip2_layer_norm(("post_layernorm",), f"{prefix}post_layernorm")
    return maps


def blip2_qformer_tensor_maps(
    config: qformer.QFormerConfig,
    prefix: str = BLIP2_QFORMER_PREFIX,
    query_tokens_name: str = BLIP2_QUERY_TOKENS,
    embeddings_prefix: str = BLIP2_TEXT_EMBEDDINGS_PREFIX,
) -> dict[Path, TensorMap]:
    """Flax path -> HF tensor for `Blip2QFormerModel` under `prefix`, the `query_tokens` and (with
    `use_qformer_text_input`) the `Blip2TextEmbeddings` under `embeddings_prefix` (see `qformer.py`)."""
    maps: dict[Path, TensorMap] = {("query_tokens",): _LeadingOnesMap(query_tokens_name, ones=1)}
    maps |= _blip2_layer_norm(("layernorm",), f"{prefix}layernorm")
    if config.use_qformer_text_input:
        for table in ("word_embeddings", "position_embeddings"):
            maps[("embeddings", table, "embedding")] = TensorMap(f"{embeddings_prefix}{table}.weight")
    for i in range(config.num_hidden_layers):
        flax_layer, hf_layer = f"layer_{i}", f"{prefix}encoder.layer.{i}"
        attentions = ["attention"] + (["crossattention"] if config.has_cross_attention(i) else [])
        for attn in attentions:
            for proj in ("query", "key", "value"):
                maps |= _blip2_linear((flax_layer, attn, proj), f"{hf_layer}.{attn}.attention.{proj}", out_groups=2)
            maps |= _blip2_linear((flax_layer, attn, "output"), f"{hf_layer}.{attn}.output.dense", in_groups=2)
            maps |= _blip2_layer_norm((flax_layer, attn, "layer_norm"), f"{hf_layer}.{attn}.output.LayerNorm")
        ffns = [("feed_forward_query", "_query")] + ([("feed_forward", "")] if config.use_qformer_text_input else [])
        for flax_ffn, suffix in ffns:
            maps |= _blip2_linear((flax_layer, flax_ffn, "intermediate"), f"{hf_layer}.intermediate{suffix}.dense")
            maps |= _blip2_linear((flax_layer, flax_ffn, "output"), f"{hf_layer}.output{suffix}.dense")
            maps |= _blip2_layer_norm((flax_layer, flax_ffn, "layer_norm"), f"{hf_layer}.output{suffix}.LayerNorm")
    return maps


def _blip2_param_shapes(init_fn: Callable[[jax.Array], Any]) -> dict[Path, tuple[int, ...]]:
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    return {path: tuple(x.shape) for path, x in _flat(nn.unbox(abstract)).items()}


def blip2_vision_param_shapes(config: vit.ViTConfig) -> dict[Path, tuple[int, ...]]:
    """Flax param shapes of `vit.VisionTransformer` by path, from an abstract init (no memory)."""
    return _blip2_param_shapes(functools.partial(vit.init_params, config))


def blip2_qformer_param_shapes(config: qformer.QFormerConfig) -> dict[Path, tuple[int, ...]]:
    """Flax param shapes of `qformer.QFormer` by path, from an abstract init (no memory)."""
    return _blip2_param_shapes(functools.partial(qformer.init_params, config))


def _blip2_config(
    cls: Any, source: Blip2Source, config: Any, dtype: Any, overrides: Mapping[str, Any]
) -> tuple[Any, Any]:
    """`(config, param dtype)`: `config` (or the one in `source`/config.json) with `param_dtype=dtype`."""
    if config is None:
        if isinstance(source, Mapping):
            raise ValueError(f"loading a {cls.__name__} from a state dict needs `config`")
        hf_config = _read_json(os.path.join(os.fspath(source), CONFIG_FILE))
        dtype = jnp.dtype(dtype or _dtype_from_hf(hf_config))
        return cls.from_hf_dict(hf_config, **{"param_dtype": dtype, **overrides}), dtype
    dtype = jnp.dtype(dtype or config.param_dtype)
    return dataclasses.replace(config, **{"param_dtype": dtype, **overrides}), dtype


def _load_blip2_part(
    source: Blip2Source,
    maps: Mapping[Path, TensorMap],
    shapes: Mapping[Path, tuple[int, ...]],
    prefixes: tuple[str, ...],
    dtype: Any,
    shardings: Any,
) -> dict[str, Any]:
    """Reads the tensors of `maps` (others outside `prefixes` are ignored) into a nested Flax params dict."""
    _check_same_paths("tensor maps", maps, shapes)
    flat_shardings = None
    if shardings is not None:
        flat_shardings = _flat(shardings)
        _check_same_paths("shardings", flat_shardings, shapes)
    with _blip2_reader(source) as reader:
        check_tensors(reader, maps, shapes, ignore=lambda name: not name.startswith(prefixes))
        flat = read_tensors(reader, maps, shapes, dtype, flat_shardings)
    return traverse_util.unflatten_dict(flat)


def load_blip2_vision(
    source: Blip2Source,
    *,
    config: vit.ViTConfig | None = None,
    prefix: str = BLIP2_VISION_PREFIX,
    dtype: Any = None,
    shardings: Any = None,
    **config_overrides: Any,
) -> tuple[vit.ViTConfig, dict[str, Any]]:
    """Reads BLIP-2's vision transformer from a HF checkpoint into `vit.VisionTransformer` params.

    Args:
      source: a HF directory (config.json + safetensors, e.g. `Salesforce/blip2-itm-vit-g`) or a
        `{hf_name: array}` state dict (then `config` is required).
      config: the model config (default: from `source/config.json`, `vision_config` of a `Blip2Config`).
      prefix: HF name prefix of the vision model (`""` for a saved `Blip2VisionModel` alone).
      dtype: dtype of the loaded params (default: the checkpoint's, or `config.param_dtype`); becomes `param_dtype`.
      shardings: optional tree of `jax.sharding.Sharding` matching the params (see `load_qwen2`).
      **config_overrides: JAX-side `ViTConfig` fields, e.g. `dtype=jnp.bfloat16`, `frozen=True`.
    Returns:
      `(config, params)`, params the `"params"` collection (plain nested dict).
    Raises:
      ValueError naming each missing, wrongly-shaped or unexpected tensor under `prefix` (others are ignored).
    """
    config, dtype = _blip2_config(vit.ViTConfig, source, config, dtype, config_overrides)
    maps, shapes = blip2_vision_tensor_maps(config, prefix), blip2_vision_param_shapes(config)
    return config, _load_blip2_part(source, maps, shapes, (prefix,), dtype, shardings)


def load_blip2_qformer(
    source: Blip2Source,
    *,
    config: qformer.QFormerConfig | None = None,
    prefix: str = BLIP2_QFORMER_PREFIX,
    query_tokens_name: str = BLIP2_QUERY_TOKENS,
    embeddings_prefix: str = BLIP2_TEXT_EMBEDDINGS_PREFIX,
    dtype: Any = None,
    shardings: Any = None,
    **config_overrides: Any,
) -> tuple[qformer.QFormerConfig, dict[str, Any]]:
    """Reads BLIP-2's Q-Former, its `query_tokens` and (with `use_qformer_text_input`) its text embeddings
    from a HF checkpoint into `qformer.QFormer` params. Arguments as `load_blip2_vision`; the config comes
    from `qformer_config` + `num_query_tokens` of a `Blip2Config`.

    Raises:
      ValueError naming each missing, wrongly-shaped or unexpected tensor under the Q-Former's names (e.g.
      text-branch tensors when the config has `use_qformer_text_input=False`).
    """
    config, dtype = _blip2_config(qformer.QFormerConfig, source, config, dtype, config_overrides)
    maps = blip2_qformer_tensor_maps(config, prefix, query_tokens_name, embeddings_prefix)
    prefixes = (prefix, query_tokens_name, embeddings_prefix)
    return config, _load_blip2_part(source, maps, blip2_qformer_param_shapes(config), prefixes, dtype, shardings)


def load_blip2_heads(source: Blip2Source, names: tuple[str, ...] = BLIP2_HEADS) -> dict[str, dict[str, np.ndarray]]:
    """The linear heads present in `source` as Flax `nn.Dense` params: `{"itm_head": {"kernel": [in, out],
    "bias": [out]}, ...}` among `vision_projection`, `text_projection`, `itm_head`, `language_projection`."""
    heads = {}
    with _blip2_reader(source) as reader:
        present = set(reader.names())
        for name in names:
            maps = _blip2_linear((name,), name)
            if all(m.hf_name in present for m in maps.values()):
                heads[name] = {
                    path[-1]: m.to_flax(reader.get(m.hf_name), reader.shape(m.hf_name)[::-1])
                    for path, m in maps.items()
                }
    return heads


def _blip2_hf_tensors(
    vision_config: vit.ViTConfig,
    vision_params: Any,
    qformer_config: qformer.QFormerConfig,
    qformer_params: Any,
    heads: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """`{hf_name: (shape, fetch)}` of a `Blip2ForImageTextRetrieval` checkpoint (see `write_safetensors`)."""
    parts = [
        (blip2_vision_tensor_maps(vision_config), blip2_vision_param_shapes(vision_config), vision_params),
        (blip2_qformer_tensor_maps(qformer_config), blip2_qformer_param_shapes(qformer_config), qformer_params),
    ]
    for name, params in (heads or {}).items():
        head = {name: {f: np.asarray(params[f]) for f in ("kernel", "bias")}}
        parts.append((_blip2_linear((name,), name), {path: x.shape for path, x in _flat(head).items()}, head))
    pieces: dict[str, list[tuple[TensorMap, Any]]] = {}
    hf_shapes: dict[str, tuple[int, ...]] = {}
    for maps, shapes, params in parts:
        flat = _checked_flat(params, shapes)
        for path, shape in shapes.items():
            m = maps[path]
            pieces.setdefault(m.hf_name, []).append((m, flat[path]))
            hf_shapes[m.hf_name] = m.hf_shape(shape)

    def fetch(name: str) -> np.ndarray:  # a sum: `qkv.bias` is assembled from its q and v chunks
        return functools.reduce(np.add, (m.to_hf(_to_host(x)) for m, x in pieces[name]))

    return {name: (hf_shapes[name], functools.partial(fetch, name)) for name in sorted(pieces)}


def blip2_state_dict(
    vision_config: vit.ViTConfig,
    vision_params: Any,
    qformer_config: qformer.QFormerConfig,
    qformer_params: Any,
    heads: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, np.ndarray]:
    """The HF `Blip2ForImageTextRetrieval` state dict (numpy, on this host) of our params.

    `heads`: optional `{"vision_projection" | "text_projection" | "itm_head": {"kernel", "bias"}}` (Flax
    `nn.Dense` layouts, as `load_blip2_heads` returns). The ViT's k bias is written as zeros.
    """
    tensors = _blip2_hf_tensors(vision_config, vision_params, qformer_config, qformer_params, heads)
    return {name: fetch() for name, (_, fetch) in tensors.items()}


def blip2_hf_config(
    vision_config: vit.ViTConfig,
    qformer_config: qformer.QFormerConfig,
    image_text_hidden_size: int = 256,
    dtype: Any = None,
) -> dict[str, Any]:
    """An HF `Blip2Config` dict for `Blip2ForImageTextRetrieval` (no language model); `dtype` (default the
    ViT's `param_dtype`) is the checkpoint's tensor dtype."""
    if qformer_config.encoder_hidden_size != vision_config.hidden_size:
        raise ValueError(
            f"Q-Former encoder_hidden_size {qformer_config.encoder_hidden_size} != ViT hidden_size "
            f"{vision_config.hidden_size}"
        )
    dtype_name = jnp.dtype(dtype or vision_config.param_dtype).name
    return {
        "architectures": ["Blip2ForImageTextRetrieval"],
        "model_type": "blip-2",
        "num_query_tokens": qformer_config.num_query_tokens,
        "image_text_hidden_size": image_text_hidden_size,
        "image_token_index": None,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "vision_config": vision_config.to_hf_dict(),
        "qformer_config": qformer_config.to_hf_dict(),
        "torch_dtype": dtype_name,  # transformers 4.x
        "dtype": dtype_name,  # transformers 5.x
    }


def save_blip2(
    hf_dir: str,
    vision_config: vit.ViTConfig,
    vision_params: Any,
    qformer_config: qformer.QFormerConfig,
    qformer_params: Any,
    *,
    heads: Mapping[str, Mapping[str, Any]] | None = None,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes a HF `Blip2ForImageTextRetrieval` checkpoint (config.json + safetensors) of our params.

    `heads` as in `blip2_state_dict` (without them, transformers initialises the heads randomly).
    `dtype`: tensor dtype on disk (default `vision_config.param_dtype`). Call it on every process; process 0
    writes. The result loads with `transformers.Blip2ForImageTextRetrieval.from_pretrained(hf_dir)`.
    """
    dtype = jnp.dtype(dtype or vision_config.param_dtype)
    image_text_hidden_size = 256
    if heads and "vision_projection" in heads:
        image_text_hidden_size = int(np.shape(heads["vision_projection"]["kernel"])[-1])
    hf_config = blip2_hf_config(vision_config, qformer_config, image_text_hidden_size, dtype)
    tensors = _blip2_hf_tensors(vision_config, vision_params, qformer_config, qformer_params, heads)
    write_checkpoint(hf_dir, hf_config, tensors, dtype, max_shard_bytes)


# ----------------------------------------------------------------------------------------------------------
# BART / mBART: `(M)BartForConditionalGeneration` checkpoints (`model.`-prefixed) or bare `(M)BartModel` ones.
#
# The token embeddings are one tensor (`model.shared.weight`, tied to both `embed_tokens` and `lm_head`);
# older exports that also store the tied copies have them ignored, and exports that kept only a tied copy
# are read from it. A missing `final_logits_bias` (HF's `_keys_to_ignore_on_load_missing`) loads as zeros.

_BART_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _bart_linear(flax_path: Path, hf_name: str, out_groups: int = 1, in_groups: int = 1) -> dict[Path, TensorMap]:
    """A torch `nn.Linear` `weight [out, in]` / `bias [out]` as a Flax kernel `[*in, *out]` / bias `[*out]`."""
    return {
        (*flax_path, "kernel"): TensorMap(f"{hf_name}.weight", (1, 0), (in_groups, out_groups)),
        (*flax_path, "bias"): TensorMap(f"{hf_name}.bias", (), (out_groups,)),
    }


def bart_tensor_maps(
    config: bart.BartConfig, prefix: str = "model.", shared_name: str | None = None
) -> dict[Path, TensorMap]:
    """Flax path -> HF tensor for `(M)BartForConditionalGeneration` (see `bart.py` for the Flax layouts).

    prefix: `"model."` (`*ForConditionalGeneration`) or `""` (a bare `BartModel`, which has no
    `final_logits_bias`). shared_name: the HF tensor holding the token embeddings (default `{prefix}shared.weight`).
    """
    maps: dict[Path, TensorMap] = {("shared", "embedding"): TensorMap(shared_name or f"{prefix}shared.weight")}
    if prefix:
        maps[("final_logits_bias",)] = _LeadingOnesMap("final_logits_bias", ones=1)
    for stack, num_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        hf_stack = f"{prefix}{stack}"
        maps[(stack, "embed_positions", "embedding")] = TensorMap(f"{hf_stack}.embed_positions.weight")
        norms = ["layernorm_embedding"] + (["layer_norm"] if config.normalize_before else [])
        for norm in norms:
            maps |= _blip2_layer_norm((stack, norm), f"{hf_stack}.{norm}")
        attentions = ["self_attn"] + (["encoder_attn"] if stack == "decoder" else [])
        for i in range(num_layers):
            flax_layer, hf_layer = (stack, f"layers_{i}"), f"{hf_stack}.layers.{i}"
            for attn in attentions:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    maps |= _bart_linear((*flax_layer, attn, proj), f"{hf_layer}.{attn}.{proj}", out_groups=2)
                maps |= _bart_linear((*flax_layer, attn, "out_proj"), f"{hf_layer}.{attn}.out_proj", in_groups=2)
                maps |= _blip2_layer_norm((*flax_layer, f"{attn}_layer_norm"), f"{hf_layer}.{attn}_layer_norm")
            for fc in ("fc1", "fc2"):
                maps |= _bart_linear((*flax_layer, fc), f"{hf_layer}.{fc}")
            maps |= _blip2_layer_norm((*flax_layer, "final_layer_norm"), f"{hf_layer}.final_layer_norm")
    return maps


def bart_param_shapes(config: bart.BartConfig) -> dict[Path, tuple[int, ...]]:
    """Flax param shapes by path, from an abstract init (no memory)."""
    abstract = jax.eval_shape(functools.partial(bart.init_params, config), jax.random.key(0))
    return {path: tuple(x.shape) for path, x in _flat(nn.unbox(abstract)).items()}


def _bart_layout(names: list[str], hf_dir: str) -> tuple[str, str]:
    """`(prefix, shared tensor name)` of a BART checkpoint from its tensor names."""
    present = set(names)
    for prefix in ("model.", ""):
        candidates = [f"{prefix}shared.weight"] + [f"{prefix}{name}" for name in _BART_TIED_COPIES]
        candidates += ["lm_head.weight"] if prefix else []
        found = [name for name in candidates if name in present]
        if found and any(n.startswith(f"{prefix}encoder.") for n in present):
            return prefix, found[0]
    raise ValueError(
        f"checkpoint {hf_dir} has no BART embeddings: expected 'model.shared.weight' or 'shared.weight' "
        f"(or a tied copy) next to the encoder's tensors, among its {len(present)} tensors"
    )


def _bart_ignored(prefix: str, shared_name: str) -> Callable[[str], bool]:
    """Tied copies of the token embeddings and HF's ignorable `*.version` buffers."""
    tied = {f"{prefix}shared.weight", "lm_head.weight"} | {f"{prefix}{name}" for name in _BART_TIED_COPIES}

    def ignore(name: str) -> bool:
        return (name in tied and name != shared_name) or name.endswith(("encoder.version", "decoder.version"))

    return ignore


def read_bart_config(hf_dir: str, **overrides: Any) -> bart.BartConfig:
    """`BartConfig` from `hf_dir/config.json`; `overrides` set JAX-side fields (dtype, param_dtype)."""
    return bart.BartConfig.from_hf_dict(_read_json(os.path.join(hf_dir, CONFIG_FILE)), **overrides)


def load_bart(
    hf_dir: str, *, dtype: Any = None, shardings: Any = None, **config_overrides: Any
) -> tuple[bart.BartConfig, dict[str, Any]]:
    """Reads a HF BART / mBART checkpoint directory (config.json + safetensors, no torch) into Flax params.

    Args:
      hf_dir: directory with `config.json` and `model.safetensors` or shards + `model.safetensors.index.json`
        (`(M)BartForConditionalGeneration.save_pretrained`, or a bare `(M)BartModel`'s).
      dtype: dtype of the loaded params (default: the checkpoint's `torch_dtype`); becomes `param_dtype`.
      shardings: optional tree of `jax.sharding.Sharding` matching the params, e.g.
        `sharding.logical_shardings(jax.eval_shape(functools.partial(bart.init_params, config), rng), mesh)`.
        Each tensor is then assembled with `jax.make_array_from_callback`, reading only local slices.
      **config_overrides: JAX-side `BartConfig` fields, e.g. `dtype=jnp.bfloat16` (activations).
    Returns:
      `(config, params)`, params the `"params"` collection of `bart.Bart` (plain nested dict).
    Raises:
      ValueError naming each missing, wrongly-shaped or unexpected tensor.
    """
    if "param_dtype" in config_overrides:
        raise TypeError("load_bart: pass the params' dtype as dtype=, not param_dtype=")
    hf_config = _read_json(os.path.join(hf_dir, CONFIG_FILE))
    dtype = jnp.dtype(dtype or _dtype_from_hf(hf_config))
    config = bart.BartConfig.from_hf_dict(hf_config, param_dtype=dtype, **config_overrides)
    shapes = bart_param_shapes(config)
    flat_shardings = None
    if shardings is not None:
        flat_shardings = _flat(shardings)
        _check_same_paths("shardings", flat_shardings, shapes)
    with SafetensorsDir(hf_dir) as reader:
        prefix, shared_name = _bart_layout(reader.names(), hf_dir)
        maps = bart_tensor_maps(config, prefix, shared_name)
        bias_path = ("final_logits_bias",)
        _check_same_paths("bart_tensor_maps", {bias_path: None, **maps}, shapes)
        if bias_path in maps and maps[bias_path].hf_name not in reader.names():
            del maps[bias_path]  # HF's `_keys_to_ignore_on_load_missing`: zeros
        read_shapes = {path: shapes[path] for path in maps}
        check_tensors(reader, maps, read_shapes, ignore=_bart_ignored(prefix, shared_name))
        flat = read_tensors(reader, maps, read_shapes, dtype, flat_shardings)
    if bias_path not in flat:
        zeros = np.zeros(shapes[bias_path], dtype)
        flat[bias_path] = (
            jnp.asarray(zeros) if flat_shardings is None else jax.device_put(zeros, flat_shardings[bias_path])
        )
    return config, traverse_util.unflatten_dict(flat)


def save_bart(
    hf_dir: str,
    config: bart.BartConfig,
    params: Any,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes `params` (possibly sharded, boxed, or under a `"params"` key) as a HF
    `(M)BartForConditionalGeneration` checkpoint (`model.shared.weight` holds the tied embeddings).

    `dtype`: tensor dtype on disk (default `config.param_dtype`). Call it on every process; process 0 writes.
    The result loads with `transformers.BartForConditionalGeneration.from_pretrained(hf_dir)` (mBART:
    `MBartForConditionalGeneration`).
    """
    dtype = jnp.dtype(dtype or config.param_dtype)
    tensors = _model_tensors(params, bart_tensor_maps(config), bart_param_shapes(config))
    write_checkpoint(hf_dir, config.to_hf_dict(torch_dtype=dtype), tensors, dtype, max_shard_bytes)
