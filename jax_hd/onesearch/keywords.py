"""OneSearch-V2 keyword thoughts (spec onesearch.md §2.3): keyword files, the offline LLM prompt and its parser.

Keyword file (`onesearch_keywords/1`, JSON lines, UTF-8):

    {"format": "onesearch_keywords/1", "catalogue": "<catalogue_fingerprint>", "source": "simulator" | "<model dir>"}
    {"query": "red dress", "keywords": ["red", "dress", ...], "p_keywords": ["acme", ...],
     "user_id": "17", "session_id": "42", "query_type": "simple"}
    ...

`keywords` (the core keywords of the query, <= 8) and `p_keywords` (the user-calibrated ones, <= 5) may both be
empty: such a query has no thought, so its teacher prompt equals the student's. `user_id`, `session_id` and
`query_type` are optional. A row is keyed by its `session_id` when given, else by (query, user_id); keys are unique.
`KeywordFile.lookup` resolves a session by session id, then (query, user id) (a session row answers for its user's
other sessions of the query), then a row of the query without user id (answers for every user).
The header's catalogue fingerprint (`catalogue_fingerprint`) ties the file to one catalogue: reading it against
another is an error naming both fingerprints. Readers name `file:line` of a bad row.

Offline generation (spec §2.3's three steps, `build_prompt`): query analysis (intent, category, attributes, topics)
-> keyword extraction (<= 8, merchandise intents only) -> preference calibration with the user's profile, recent
searches and recent clicks (and, for training sessions, the items the user interacted with, so the ground truth's
keywords survive) -> 1-5 P_keywords. `parse_answer` reads the final `Keywords:` / `P_Keywords:` lines (or a JSON
object) of the answer, tolerating thinking blocks, bullets, numbering, quotes and mixed separators.
`HFKeywordLLM` runs a local Hugging Face causal LM (no download); `generate_keyword_file` drives any generator
over requests, resumably (rows already in the output or its errors file are skipped; every save is atomic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jax_hd.core.metrics import atomic_write_text

FORMAT = "onesearch_keywords/1"
MAX_KEYWORDS = 8
MAX_P_KEYWORDS = 5
SIMULATOR_SOURCE = "simulator"


class KeywordFileError(ValueError):
    """A keyword file is malformed or belongs to another catalogue; the message names the file and line."""


class KeywordParseError(ValueError):
    """An LLM answer holds no parsable keyword lines."""


@dataclasses.dataclass(frozen=True)
class KeywordEntry:
    """One thought: `keywords` (<= 8) and `p_keywords` (<= 5) of `query` (for `user_id` / `session_id`, '' none)."""

    query: str
    keywords: tuple[str, ...] = ()
    p_keywords: tuple[str, ...] = ()
    user_id: str = ""
    session_id: str = ""
    query_type: str = ""

    @property
    def key(self) -> tuple[str, ...]:
        return ("session", self.session_id) if self.session_id else ("query", self.query, self.user_id)

    def describe(self) -> str:
        if self.session_id:
            return f"session_id {self.session_id!r}"
        return f"query {self.query!r}" + (f" user_id {self.user_id!r}" if self.user_id else "")

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"query": self.query, "keywords": list(self.keywords)}
        row["p_keywords"] = list(self.p_keywords)
        for name in ("user_id", "session_id", "query_type"):
            if getattr(self, name):
                row[name] = getattr(self, name)
        return row


@dataclasses.dataclass(frozen=True, eq=False)
class KeywordFile:
    """A read keyword file: header fields and the entries in file order."""

    catalogue: str
    source: str
    entries: tuple[KeywordEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def _index(self) -> dict[tuple[str, ...], KeywordEntry]:
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {}
            for e in self.entries:
                index.setdefault(e.key, e)
                if e.session_id:  # a session row also answers its (query, user); only user-less rows any user
                    index.setdefault(("query", e.query, e.user_id), e)
            object.__setattr__(self, "_index_cache", index)
        return index

    def lookup(self, query: str, user_id: str = "", session_id: str = "") -> KeywordEntry | None:
        """The entry of a session (by session id), else of (query, user id), else of the query; None if absent."""
        index = self._index
        if session_id and ("session", session_id) in index:
            return index[("session", session_id)]
        return index.get(("query", query, user_id)) or index.get(("query", query, ""))


def catalogue_fingerprint(item_ids: Iterable[str]) -> str:
    """`sha1:<16 hex>:n=<count>` of the sorted item ids: identifies the catalogue a keyword file was built for."""
    ids = sorted(str(i) for i in item_ids)
    return f"sha1:{hashlib.sha1(chr(10).join(ids).encode()).hexdigest()[:16]}:n={len(ids)}"


# ----------------------------------------------------------------------------------------------------------
# Reading and writing.


def _words(value: Any, name: str, limit: int, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
        raise KeywordFileError(f"{where}: {name!r} must be a list of non-empty strings, got {value!r}")
    if len(value) > limit:
        raise KeywordFileError(f"{where}: {name!r} has {len(value)} entries, at most {limit} allowed")
    return tuple(w.strip() for w in value)


def _entry(row: Any, where: str) -> KeywordEntry:
    if not isinstance(row, dict):
        raise KeywordFileError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    unknown = set(row) - {"query", "keywords", "p_keywords", "user_id", "session_id", "query_type"}
    if unknown:
        raise KeywordFileError(f"{where}: unknown field(s) {sorted(unknown)}")
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        raise KeywordFileError(f"{where}: 'query' must be a non-empty string, got {query!r}")
    optional = {}
    for name in ("user_id", "session_id", "query_type"):
        value = row.get(name, "")
        if isinstance(value, int) and not isinstance(value, bool) and name != "query_type":
            value = str(value)
        if not isinstance(value, str):
            raise KeywordFileError(f"{where}: {name!r} must be a string, got {value!r}")
        optional[name] = value
    return KeywordEntry(
        query=query,
        keywords=_words(row.get("keywords", []), "keywords", MAX_KEYWORDS, where),
        p_keywords=_words(row.get("p_keywords", []), "p_keywords", MAX_P_KEYWORDS, where),
        **optional,
    )


def read_keyword_file(path: str, *, catalogue: str | None = None) -> KeywordFile:
    """Reads and validates a keyword file; `catalogue` (a fingerprint) must match the header's when given.

    Raises `KeywordFileError` naming `path:line` (bad JSON, header, field, duplicate key) or both fingerprints, and
    `FileNotFoundError` for a missing file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"keyword file not found: {path}")
    header: dict[str, Any] | None = None
    entries: list[KeywordEntry] = []
    seen: dict[tuple[str, ...], int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise KeywordFileError(f"{where}: invalid JSON ({e.msg})") from e
            if header is None:
                if not isinstance(row, dict) or row.get("format") != FORMAT:
                    raise KeywordFileError(f"{where}: the first row must be the header {{'format': {FORMAT!r}, ...}}")
                for name in ("catalogue", "source"):
                    if not isinstance(row.get(name), str) or not row[name]:
                        raise KeywordFileError(f"{where}: header field {name!r} must be a non-empty string")
                header = row
                if catalogue is not None and row["catalogue"] != catalogue:
                    raise KeywordFileError(
                        f"{where}: keyword file built for catalogue {row['catalogue']} but the data's catalogue is "
                        f"{catalogue}"
                    )
                continue
            entry = _entry(row, where)
            if entry.key in seen:
                raise KeywordFileError(f"{where}: duplicate {entry.describe()} (first at line {seen[entry.key]})")
            seen[entry.key] = number
            entries.append(entry)
    if header is None:
        raise KeywordFileError(f"{path}: empty file (no header)")
    return KeywordFile(header["catalogue"], header["source"], tuple(entries))


def write_keyword_file(path: str, entries: Iterable[KeywordEntry], *, catalogue: str, source: str) -> None:
    """Writes a keyword file atomically; entries are checked as the reader would (ValueError naming the row)."""
    lines = [json.dumps({"format": FORMAT, "catalogue": catalogue, "source": source}, ensure_ascii=False)]
    seen: set[tuple[str, ...]] = set()
    for i, e in enumerate(entries):
        row = e.to_json()
        _entry(row, f"{path}: entry {i}")
        if e.key in seen:
            raise KeywordFileError(f"{path}: entry {i}: duplicate {e.describe()}")
        seen.add(e.key)
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def simulator_entries(log: Any, sessions: Sequence[int] | None = None) -> list[KeywordEntry]:
    """One entry per session of a `catalog.QueryLog` (all, or `sessions` rows) from its thoughts (`log.keywords`,
    `log.preference_keywords`, `log.query_types`)."""
    rows = range(len(log)) if sessions is None else sessions
    return [
        KeywordEntry(
            query=str(log.queries[s]),
            keywords=tuple(log.keywords[s])[:MAX_KEYWORDS],
            p_keywords=tuple(log.preference_keywords[s])[:MAX_P_KEYWORDS],
            user_id=str(log.user_ids[s]),
            session_id=str(log.session_ids[s]),
            query_type=str(log.query_types[s]),
        )
        for s in rows
    ]


def session_thoughts(
    log: Any, keyword_file: KeywordFile | None = None
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Per session of `log`: (core keywords, preference keywords); from the log's own thoughts when `keyword_file`
    is None, else looked up in the file (session id, then (query, user), then query; missing -> ())."""
    if keyword_file is None:
        return [tuple(k) for k in log.keywords], [tuple(k) for k in log.preference_keywords]
    core, pref = [], []
    for q, u, s in zip(log.queries.tolist(), log.user_ids.tolist(), log.session_ids.tolist(), strict=True):
        e = keyword_file.lookup(q, u, s)
        core.append(e.keywords if e else ())
        pref.append(e.p_keywords if e else ())
    return core, pref


# ----------------------------------------------------------------------------------------------------------
# The offline LLM: prompt and answer parser.

_PROMPT = """You are an e-commerce search analyst. Think step by step, then answer in the exact format below.

Step 1 - Query analysis. For the search query, state: (a) the intent: merchandise retrieval, or another intent
(a shop, a live room, a service, chit-chat); for any other intent stop after step 1 and write "Keywords: none";
(b) the product category, coarse to fine; (c) only the attributes the query states explicitly (colour, brand,
material, style, price, negation such as "not red" or "without leather"); (d) topic recommendations: product
topics consistent with the category and the attributes.
Step 2 - Keyword extraction. From the topic recommendations (else from category + attributes) write at most 8
keywords an item title would contain: keep the retrieval intent, the category constraint and the attributes
(for a negation, keywords of the allowed alternatives, never the excluded value); merge synonyms; drop marketing
and redundant words; keep model numbers; most popular first.
Step 3 - Preference calibration. Using the user's profile, recent searches and recent clicks{session_hint}, keep,
filter or add keywords so they fit this user: write 1 to 5 keywords.

Query: {query}
User profile: {profile}
Recent searches: {searches}
Recent clicks: {clicks}{session_items}

Answer format (last three lines):
Query type: <simple | question | negation | substitute | recommend | other>
Keywords: <keyword 1>; <keyword 2>; ...
P_Keywords: <keyword 1>; ...
"""


def build_prompt(
    query: str,
    *,
    profile: Sequence[str] = (),
    recent_searches: Sequence[str] = (),
    recent_clicks: Sequence[str] = (),
    session_items: Sequence[str] = (),
) -> str:
    """The three-step keyword prompt (spec §2.3) for one request. `recent_clicks` / `session_items` are item titles;
    `session_items` (training data only: the items interacted with in this session) keep the ground truth's
    keywords through the calibration."""
    if not query.strip():
        raise ValueError("build_prompt: empty query")

    def listing(values: Sequence[str]) -> str:
        return "; ".join(v for v in values if v) or "none"

    return _PROMPT.format(
        query=query.strip(),
        profile=listing(profile),
        searches=listing(recent_searches),
        clicks=listing(recent_clicks),
        session_hint=" (and the items interacted with in this session)" if session_items else "",
        session_items=f"\nItems interacted with in this session: {listing(session_items)}" if session_items else "",
    )


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_P_LABEL = r"(?:p[\s_-]*keywords?|preference[\s_-]*keywords?|calibrated[\s_-]*keywords?)"
_K_LABEL = r"(?:core[\s_-]*)?keywords?"
_LINE = r"^[\s>*#\-\d.)]*\**\s*{label}\s*\**\s*[:：=]\s*(.*)$"
_P_LINE = re.compile(_LINE.format(label=_P_LABEL), re.I | re.M)
_K_LINE = re.compile(_LINE.format(label=_K_LABEL), re.I | re.M)
_TYPE_LINE = re.compile(_LINE.format(label=r"query[\s_-]*type"), re.I | re.M)
_SPLIT = re.compile(r"[;,，；、|\n]|\s+-\s+")
_NONE = {"none", "n/a", "na", "null", "nil", "-", "no keywords", "empty"}


def split_keywords(text: str, limit: int) -> tuple[str, ...]:
    """Keywords of one answer field: split on `; , | / 、` etc., stripped of quotes, brackets, bullets and numbering,
    `none` dropped, de-duplicated case-insensitively (first kept), at most `limit`."""
    out: list[str] = []
    seen: set[str] = set()
    for part in _SPLIT.split(text):
        word = re.sub(r"^\s*(?:[\-*•]|\d+[.)])\s+", "", part)
        word = word.strip().strip("\"'`“”‘’[](){}<>*").strip().rstrip(".")
        word = re.sub(r"\s+", " ", word)
        if not word or word.lower() in _NONE or word.lower() in seen:
            continue
        seen.add(word.lower())
        out.append(word)
    return tuple(out[:limit])


def _from_json(text: str) -> dict[str, Any] | None:
    """The last JSON object in `text` that has a keyword field (case-insensitive), else None."""
    for match in reversed(list(re.finditer(r"\{[^{}]*\}", text, re.S))):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            lowered = {re.sub(r"[\s_-]", "", str(k).lower()): v for k, v in obj.items()}
            if "keywords" in lowered or "pkeywords" in lowered:
                return lowered
    return None


def _field(value: Any, limit: int) -> tuple[str, ...]:
    if isinstance(value, list):
        return split_keywords("; ".join(str(v) for v in value if v is not None), limit)
    return split_keywords(str(value or ""), limit)


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    keywords: tuple[str, ...]
    p_keywords: tuple[str, ...]
    query_type: str = ""


def parse_answer(text: str) -> ParsedAnswer:
    """Keywords of an LLM answer: the last `Keywords:` and `P_Keywords:` lines (after any `<think>` block), or the
    last JSON object with a `keywords` field. "Keywords: none" is a valid empty answer (non-merchandise intent).
    P_keywords missing while keywords exist fall back to the first keyword. Raises `KeywordParseError` when no
    keyword field is found."""
    body = _THINK.sub("", text or "")
    obj = _from_json(body)
    if obj is not None:
        kw = _field(obj.get("keywords"), MAX_KEYWORDS)
        pkw = _field(obj.get("pkeywords", obj.get("preferencekeywords")), MAX_P_KEYWORDS)
        qtype = str(obj.get("querytype", "") or "").strip().lower()
    else:
        k_lines = [m for m in _K_LINE.finditer(body)]
        p_lines = list(_P_LINE.finditer(body))
        if not k_lines and not p_lines:
            raise KeywordParseError(f"no 'Keywords:' line in the answer: {text[:200]!r}")
        kw = split_keywords(k_lines[-1].group(1), MAX_KEYWORDS) if k_lines else ()
        pkw = split_keywords(p_lines[-1].group(1), MAX_P_KEYWORDS) if p_lines else ()
        types = list(_TYPE_LINE.finditer(body))
        qtype = types[-1].group(1).strip().strip("<>*").strip().lower() if types else ""
    if kw and not pkw:
        pkw = kw[:1]
    return ParsedAnswer(kw, pkw, qtype.split()[0] if qtype else "")


# ----------------------------------------------------------------------------------------------------------
# Requests from a simulated world / KuaiSearch-like log, and resumable generation.


@dataclasses.dataclass(frozen=True)
class KeywordRequest:
    """One prompt to answer: its output row's identity and the prompt text."""

    query: str
    user_id: str
    session_id: str
    prompt: str

    @property
    def key(self) -> tuple[str, ...]:
        return KeywordEntry(self.query, user_id=self.user_id, session_id=self.session_id).key


def session_requests(world: Any, sessions: Sequence[int] | None = None, *, max_recent: int = 5) -> list[KeywordRequest]:
    """Prompts for sessions of a `catalog.SimulatedWorld` (or any object with `catalog`, `users`, `log`): the user's
    profile, the `max_recent` latest earlier searches and clicks; training sessions also list their clicked items."""
    from jax_hd.data import catalog as catalog_lib

    log, cat, users = world.log, world.catalog, world.users
    history = catalog_lib.history_from_log(log)
    context = catalog_lib.recent_context(log, history, k=max(max_recent, 1))
    profile_row = users.row_of
    rows = range(len(log)) if sessions is None else sessions
    out = []
    for s in rows:
        user_id = str(log.user_ids[s])
        p = profile_row.get(user_id)
        profile = []
        if p is not None:
            profile = [f"gender {users.genders[p]}", f"age {users.age_buckets[p]}", f"city {users.cities[p]}"]
        n = int(context["num_recent"][s]) if max_recent else 0
        searches = list(dict.fromkeys(q for q in context["recent_queries"][s, :n].tolist() if q))
        clicks = [str(cat.titles[i]) for i in context["recent_items"][s, :n].tolist()]
        session_items: list[str] = []
        if log.splits[s] == "train":
            imp = log.impressions(s)
            items = log.impressed_items[imp]
            ranked = np.concatenate([items[log.ordered[imp]], items[log.clicked[imp] & ~log.ordered[imp]]])
            session_items = [str(cat.titles[i]) for i in ranked.tolist()]
        prompt = build_prompt(
            str(log.queries[s]), profile=profile, recent_searches=searches, recent_clicks=clicks,
            session_items=session_items,
        )  # fmt: skip
        out.append(KeywordRequest(str(log.queries[s]), user_id, str(log.session_ids[s]), prompt))
    return out


def errors_path(path: str) -> str:
    return path + ".errors.json"


def generate_keyword_file(
    requests: Sequence[KeywordRequest],
    generate_fn: Callable[[list[str]], list[str]],
    out_path: str,
    *,
    catalogue: str,
    source: str,
    batch_size: int = 8,
    save_every: int = 1,
    resume: bool = True,
    query_types: Mapping[tuple[str, ...], str] | None = None,
) -> dict[str, Any]:
    """Answers every request with `generate_fn` (a batch of prompts -> answers) and writes the keyword file.

    Parsed answers go to `out_path`, unparsable ones to `errors_path(out_path)` (`{key: {"error", "response"}}`),
    both rewritten atomically every `save_every` batches and at the end (also on an exception). With `resume`,
    requests whose key is already in either file are skipped (delete the errors file to retry failures); an
    existing file for another catalogue is a `KeywordFileError`. `query_types` (key -> type) fills rows whose
    answer names no query type. Returns counts.
    """
    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch_size ({batch_size}) and save_every ({save_every}) must be >= 1")
    entries: dict[tuple[str, ...], KeywordEntry] = {}
    errors: dict[str, dict[str, str]] = {}
    if resume and os.path.exists(out_path):
        entries = {e.key: e for e in read_keyword_file(out_path, catalogue=catalogue).entries}
    if resume and os.path.exists(errors_path(out_path)):
        with open(errors_path(out_path), encoding="utf-8") as f:
            errors = json.load(f)
    done = set(entries) | {tuple(json.loads(k)) for k in errors}
    todo = [r for r in requests if r.key not in done]
    num_resumed = len(requests) - len(todo)

    def save() -> None:
        write_keyword_file(out_path, entries.values(), catalogue=catalogue, source=source)
        atomic_write_text(errors_path(out_path), json.dumps(errors, indent=1, ensure_ascii=False))

    try:
        for b, start in enumerate(range(0, len(todo), batch_size)):
            batch = todo[start : start + batch_size]
            answers = generate_fn([r.prompt for r in batch])
            if len(answers) != len(batch):
                raise ValueError(f"generate_fn returned {len(answers)} answers for {len(batch)} prompts")
            for r, answer in zip(batch, answers, strict=True):
                try:
                    parsed = parse_answer(answer)
                except KeywordParseError as e:
                    errors[json.dumps(list(r.key))] = {"error": str(e), "response": answer}
                    continue
                qtype = parsed.query_type or (query_types or {}).get(r.key, "")
                entries[r.key] = KeywordEntry(
                    r.query, parsed.keywords, parsed.p_keywords, r.user_id, r.session_id, qtype
                )
            if (b + 1) % save_every == 0:
                save()
    finally:
        save()
    return {
        "num_requests": len(requests),
        "num_written": len(entries),
        "num_failed": len(errors),
        "num_resumed": num_resumed,
        "out_path": out_path,
        "errors_path": errors_path(out_path),
    }


class HFKeywordLLM:
    """Answers keyword prompts with a local Hugging Face causal LM (`AutoModelForCausalLM` + `AutoTokenizer`,
    `local_files_only`: nothing is downloaded). The tokenizer's chat template wraps each prompt when it has one.
    Greedy decoding of `max_new_tokens`, one left-padded batch per call. Torch and transformers are imported here."""

    def __init__(self, model_dir: str, *, max_new_tokens: int = 256, dtype: str = "float32", device: str = "cpu"):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"causal LM directory not found: {model_dir}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not hasattr(torch, dtype):
            raise ValueError(f"unknown torch dtype {dtype!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.tokenizer.padding_side = "left"  # decoder-only generation: prompts end where the answers start
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=getattr(torch, dtype)
        ).to(device)
        self.model.eval()
        self.torch, self.device, self.max_new_tokens = torch, device, max_new_tokens

    def __call__(self, prompts: list[str]) -> list[str]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [
                tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                for p in prompts
            ]
        else:
            texts = list(prompts)
        inputs = tok(texts, return_tensors="pt", padding=True).to(self.device)
        with self.torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        return tok.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
