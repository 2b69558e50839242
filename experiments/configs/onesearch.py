"""Presets of OneSearch SFT (`experiments/onesearch.py`, `jax_hd.onesearch.trainer`).

    python -m experiments.onesearch --config=experiments/configs/onesearch.py:cpu_demo --workdir=runs/onesearch_demo

Presets: `cpu_test` (seconds; tests: a 300-item world, hashed embeddings, a 1+1-layer BART), `cpu_demo` (the
embedded simulated world at 2k items, real MiniLM embeddings for the SIDs, BART 2+2 layers d=128, 100 / 50 / 3,000
steps in the three SFT stages; ~13 minutes on 2 CPU cores), `bart_base_paper` (BART-base 6+6 d=768, spec §1.4's
4096-1024-512 + OPQ 2x256 codebooks, beam 512; accelerator scale).

Real logs (`data.source`; give the paths on the command line, e.g. `--config.data.root=/data/kuaisearch`):
`cpu_test_kuaisearch`, `cpu_test_amazon2014`, `cpu_test_amazon2018`, `cpu_test_esci` (cpu_test sizes; tests set the
paths to fixture files), `kuaisearch_paper` (bart_base_paper on KuaiSearch), `amazon2014_beauty_tiger` (TIGER's
protocol and sizes on Amazon 2014 Beauty 5-core: 256-256-256 + OPQ as the 4th level, beam 20, HR@5/10 leave-one-out;
TIGER's published Recall@10 is 0.0648) and `esci_paper` (ESCI us, small version).
"""

import ml_collections

CPU_TEST_SOURCES = ("kuaisearch", "amazon2014", "amazon2018", "esci")


def get_config(preset: str = "cpu_demo") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = ml_collections.FieldReference(None, field_type=list)
    c.distributed = ml_collections.ConfigDict(
        dict(mode="auto", coordinator_address="", num_processes=-1, process_id=-1)
    )
    # Data source (`jax_hd.onesearch.sources`): "simulated" (the embedded world, the richest signals: intents, category
    # tree, keyword thoughts, profiles, exposure), "kuaisearch" (root: directory of items.jsonl + recall.jsonl, users /
    # relevance .jsonl optional; a query's [TEXT2CAT] category is its most clicked train item's path, queries without
    # one skip the task), "amazon2014" / "amazon2018" (reviews_path + meta_path, 5-core: TIGER protocol, one clicked
    # session per review with the placeholder query "next item", leave-one-out splits; no queries, orders, profiles,
    # categories for queries, keywords or relevance: those tasks / streams / rewards are empty or 0; evaluate with
    # eval.leave_one_out_users), "esci" (examples_path + products_path, locale, esci_version small / large / all: one
    # anonymous session per query, judged products impressed, Exact = click + order, Substitute = click when
    # esci_substitute_clicks, train / test from the examples' split; no users, history, categories or keywords; the
    # "order" test set = the test queries' Exact products). skip_bad_items: Amazon / ESCI items without text,
    # duplicate meta rows and reviews of unknown items are dropped instead of raising. The num_* fields below shape
    # only the simulated world.
    # Simulated world and example budgets. max_long: long behaviour sequence cap (spec: up to ~1e3);
    # max_examples: per-stage cap (stage 3: + half as many sliding-window samples); stage3_replay: stage-3 rows mixed
    # into stages 1 and 2, as a share of each stage's size (0: none; issue 21: without them the task prompts of
    # stages 1-2 leave a generator whose first SID token ignores the personalised request).
    c.data = ml_collections.ConfigDict(
        dict(
            source="simulated",
            root="",
            reviews_path="",
            meta_path="",
            examples_path="",
            products_path="",
            locale="us",
            esci_version="small",
            esci_substitute_clicks=False,
            skip_bad_items=False,
            num_items=20_000,
            num_users=5_000,
            num_sessions=50_000,
            num_intents=4_000,
            bpe_vocab_size=2_000,
            max_long=50,
            sliding_window=True,
            max_examples=20_000,
            stage3_replay=0.0,
        )
    )
    # Semantic IDs (spec §1.4). embedder: "minilm" (real all-MiniLM-L6-v2, cached in <workdir>/cache) or "hashed".
    # uid_mode: "code_average" (spec §1.5 formula) or "centroid" (SID of the weighted mean embedding).
    # keyword_fusion: KHQE (spec §1.3), item and query embeddings fused with the mean embedding of the pool keywords
    # they contain, e = normalize((1 - w) e + w mean(e_kw)), w = keyword_weight (paper 1/2); the pool is the train
    # clicks' core keywords (at most keyword_pool_size, by session count). A source without keywords is unchanged.
    c.sid = ml_collections.ConfigDict(
        dict(
            embedder="minilm",
            embed_dim=384,
            rq_sizes=(256, 64, 32),
            opq_codebook_size=256,
            opq_subspaces=2,
            use_opq=True,
            last_level_mode="per_parent_l2",
            kmeans_iters=20,
            opq_iters=6,
            uid_mode="code_average",
            keyword_fusion=False,
            keyword_weight=0.5,
            keyword_pool_size=20_000,
        )
    )
    c.layout = ml_collections.ConfigDict(
        dict(
            max_query_tokens=12,
            max_recent=5,
            recent_query_tokens=3,
            num_memory=3,
            max_task_tokens=24,
            max_target_tokens=16,
            max_keyword_tokens=16,
        )
    )
    # OneSearch-V2 keyword thoughts (spec §2.3, §2.5; used only when enabled, so V1 stays V1). keyword_file: a
    # `jax_hd.onesearch.keywords` file (experiments/onesearch_keywords.py), '' = the simulator's own thoughts;
    # enabled adds the 4 CoT tasks to stage 1 (at most max_keywords keyword SIDs per target; labels grow to
    # max(layout.max_target_tokens, max_keywords x SID length + 1, layout.max_keyword_tokens + 1)) and teacher prompts
    # (student prompt + "[KW] kw1 [SEP] kw2 ..." of <= layout.max_keyword_tokens tokens) for every example;
    # teacher_keywords: "preference" (P_keywords) or "core" (the query's keywords).
    c.cot = ml_collections.ConfigDict(
        dict(enabled=False, keyword_file="", max_keywords=8, teacher_keywords="preference")
    )
    # Behaviour-preference alignment data (spec §1.7 phase 2, §2.6), built when enabled: max_prompts train sessions
    # with a click, their ordered-then-clicked items (max_truth), num_negatives DPO negatives from the bottom
    # behaviour levels (exposed-not-clicked, same category not exposed, other category) and a calibrated CTR
    # (clicks + a * prior) / (impressions + a) per (query, item), a = ctr_prior_strength.
    c.align = ml_collections.ConfigDict(
        dict(enabled=False, max_prompts=2_000, max_truth=4, num_negatives=6, ctr_prior_strength=20.0)
    )
    # Reasoning-internalised self-distillation in SFT stage 3 (spec §2.5; `jax_hd.onesearch.distill`). mode "off" is
    # plain SFT (V1); "self": the same weights read the keyword prompt as the teacher (stop-gradient); "ema": an EMA
    # copy. Paper values when switched on: kl_weight 0.1, temperature 1, rdrop_weight 0.5, fgm_epsilon 0.6, focal
    # gamma 3 with scale 2 (the spec's "alpha = 2", read as a scale: CONFLICT). Needs cot.enabled for the teacher
    # prompts (without keywords teacher == student and the KL is 0).
    c.distill = ml_collections.ConfigDict(
        dict(
            mode="off", kl_weight=0.1, temperature=1.0, rdrop_weight=0.0, fgm_epsilon=0.0, fgm_kl=True,
            focal_gamma=0.0, focal_scale=1.0, ema_decay=0.999,
        )
    )  # fmt: skip
    # Listwise softmax-DPO on behaviour levels after stage 3 (spec §1.7 phase 2; `alignment.DPOConfig`); steps 0
    # skips the stage. Needs align.enabled. beta / alpha / #negatives are UNKNOWN in the paper (code default alpha
    # 1.5); the reward-gap weight uses the composite item reward of spec §2.6.
    c.dpo = ml_collections.ConfigDict(
        dict(
            steps=0, lr=1e-4, warmup_steps=10, batch_size=32, beta=0.1, use_reward_gap_weight=False,
            reward_gap_alpha=1.5, sft_weight=0.0, chosen_regularisation=False,
        )
    )  # fmt: skip
    # Policy-gradient alignment after DPO (spec §2.6; `alignment.TPMAConfig`): G constrained samples per prompt,
    # composite reward R_item = relevance (0-3) + clip(CTR) + order 4 / click 3. advantage "position" = TPMA
    # (per-position marginal advantages, prefix gate, no clip), "sequence" = plain GRPO on R_item (PPO clip): the
    # "+GRPO" row. G, lr and steps are UNKNOWN in the paper (code example: G 4, lr 1e-5, temperature 1, beta 0).
    # position_weights: w_l per SID position, the authors' tpma.py (2, 2, 1, 1, 0) (= the literal eq. 12; the method
    # figure reads (2, 2, 2, 1, 1)).
    c.rl = ml_collections.ConfigDict(
        dict(
            steps=0, lr=1e-4, warmup_steps=5, prompts_per_step=32, num_samples=4, temperature=1.0,
            advantage="position", gate="fraction", position_weights=(2.0, 2.0, 1.0, 1.0, 0.0),
            item_advantage_weight=0.0, sft_weight=0.1, kl_coef=0.0, clip_eps=0.2, order_value=4.0, click_value=3.0,
        )
    )  # fmt: skip
    # table.enabled: instead of one run, the incremental table of spec §2.8 (`trainer.incremental_rows`: V1 -> + CoT
    # tasks -> + self-distillation -> + R-Drop -> + FGM -> + focal -> + DPO -> + GRPO -> + TPMA) from this (V1)
    # config, rows sharing the checkpoints of their common stages; results in <workdir>/incremental.{json,md}.
    c.table = ml_collections.ConfigDict(dict(enabled=False, dpo_steps=100, rl_steps=100))
    # sid_softmax: "sid" = the loss at a SID target position is a softmax over the SID tokens only and decoding
    # never emits a non-SID token (`model.restrict_sid_logits`); "full" = over the whole vocabulary, which with the
    # tied embeddings collapses the text-token embeddings and leaves an encoder that ignores the request (issue 21);
    # "split" = also text targets (stages 1-2) over the non-SID tokens only. tie_embeddings: the output layer is the
    # input embedding table (True, BART / HF) or its own `lm_head` (False: no output-softmax gradient reaches the
    # input embeddings).
    c.model = ml_collections.ConfigDict(
        dict(
            backbone="bart",
            sid_softmax="sid",
            tie_embeddings=True,
            d_model=128,
            encoder_layers=2,
            decoder_layers=2,
            heads=4,
            ffn_dim=512,
            dropout=0.1,
            qformer_layers=1,
            qformer_heads=4,
            qformer_hidden=128,
        )
    )
    c.trainer = ml_collections.ConfigDict(
        dict(
            batch_size=32,
            lr=2e-3,
            warmup_steps=30,
            weight_decay=0.01,
            grad_clip_norm=1.0,
            stage1_steps=150,
            stage2_steps=100,
            stage3_steps=250,
            log_every=20,
            checkpoint_every=50,
            keep_checkpoints=2,
            async_checkpoint=True,
        )
    )
    # num_beams: constrained beam width (paper 512); max_pairs: click / order test pairs each;
    # unconstrained_pairs: requests decoded without the prefix tree for the valid-ID rate;
    # long_tail_max_count: a query with at most this many train sessions is long-tail; every_stage: evaluate after
    # every stage (False: after the last one only).
    c.eval = ml_collections.ConfigDict(
        dict(
            num_beams=20,
            top_k=10,
            max_pairs=300,
            batch_size=64,
            unconstrained_pairs=128,
            long_tail_max_count=3,
            leave_one_out_users=128,
            every_stage=True,
        )
    )

    if preset == "cpu_test" or preset.removeprefix("cpu_test_") in CPU_TEST_SOURCES:
        c.data.update(
            num_items=300,
            num_users=60,
            num_sessions=900,
            num_intents=80,
            bpe_vocab_size=300,
            max_long=8,
            max_examples=512,
        )
        c.sid.update(
            embedder="hashed", embed_dim=32, rq_sizes=(8, 4, 4), opq_codebook_size=8, kmeans_iters=4, opq_iters=2
        )
        c.layout.update(
            max_query_tokens=6, max_recent=3, recent_query_tokens=2, max_task_tokens=12, max_target_tokens=8,
            max_keyword_tokens=10,
        )  # fmt: skip
        c.cot.update(max_keywords=3)
        c.align.update(max_prompts=64, num_negatives=4)
        c.dpo.update(batch_size=8)
        c.rl.update(prompts_per_step=8)
        c.table.update(dpo_steps=2, rl_steps=2)
        c.model.update(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            heads=2,
            ffn_dim=64,
            dropout=0.0,
            qformer_hidden=32,
            qformer_heads=2,
        )
        c.trainer.update(
            batch_size=16,
            warmup_steps=2,
            stage1_steps=4,
            stage2_steps=3,
            stage3_steps=4,
            log_every=2,
            checkpoint_every=2,
            async_checkpoint=False,
        )
        c.eval.update(num_beams=4, max_pairs=24, batch_size=8, unconstrained_pairs=8, leave_one_out_users=8)
        if preset != "cpu_test":
            c.data.source = preset.removeprefix("cpu_test_")
            c.data.sliding_window = c.data.source != "esci"  # ESCI: no users, so no behaviour sequences
    elif preset == "cpu_demo":
        # Sized for <= 15 minutes on 2 CPU cores (issue 21; 13 min measured on 2 shared cores, MiniLM cached): a 2k-item
        # world (~400 queries, 8k sessions) small enough that stage 3 sees every train click (~12k rows + ~8k
        # sliding-window rows) about 5 times in 3,000 steps, a SID-only softmax on SID targets and a text-only one on
        # text targets ("split"), an untied output layer, and half a stage of stage-3 rows replayed in stages 1-2
        # (without them the first SID token ignores the request). 2,000 click / order test pairs (~90 long-tail).
        # Seed 0: click HR@10 0.752 vs per-query popularity 0.727 (long-tail queries 0.598 vs 0.310). The earlier
        # 5k-item world with 10k stage-3 rows and 600 steps (1.3 epochs) reached 0.357 vs popularity 0.570.
        c.data.update(num_items=2_000, num_users=1_000, num_sessions=8_000, num_intents=400, max_examples=30_000,
                      stage3_replay=0.5)  # fmt: skip
        c.sid.update(rq_sizes=(64, 32, 16))
        c.model.update(sid_softmax="split", tie_embeddings=False)
        c.trainer.update(stage1_steps=100, stage2_steps=50, stage3_steps=3_000, log_every=100, checkpoint_every=500)
        c.eval.update(max_pairs=2_000, leave_one_out_users=64, every_stage=False)
    elif preset in ("bart_base_paper", "kuaisearch_paper", "esci_paper"):
        c.sid.update(rq_sizes=(4096, 1024, 512), opq_codebook_size=256, kmeans_iters=25, opq_iters=10)
        c.data.update(max_long=1000, max_examples=10_000_000, bpe_vocab_size=50_000)
        c.model.update(
            d_model=768,
            encoder_layers=6,
            decoder_layers=6,
            heads=12,
            ffn_dim=3072,
            dropout=0.1,
            qformer_layers=2,
            qformer_heads=12,
            qformer_hidden=768,
        )
        c.trainer.update(
            batch_size=1024,
            lr=3e-4,
            warmup_steps=2000,
            stage1_steps=50_000,
            stage2_steps=50_000,
            stage3_steps=200_000,
            checkpoint_every=2000,
            log_every=100,
        )
        c.eval.update(
            num_beams=512, top_k=350, max_pairs=30_000, batch_size=32, unconstrained_pairs=4096, leave_one_out_users=0
        )
        if preset == "kuaisearch_paper":
            # The OneSearch team's own log (full release "after review"; catalogue size UNKNOWN here): the paper's
            # codebooks as is. Users' profiles come from users.jsonl when present.
            c.data.source = "kuaisearch"
        elif preset == "esci_paper":
            # ESCI us, small version (~0.5M judgments over ~0.3M products: UNVERIFIED sizes): codebooks sized to
            # ~0.3M items, K = 100 (ESCI queries have ~20 judged products); no users, so no behaviour sequences.
            c.data.update(source="esci", locale="us", esci_version="small", skip_bad_items=True, sliding_window=False)
            c.sid.update(rq_sizes=(1024, 256, 64))
            c.eval.update(num_beams=128, top_k=100, max_pairs=20_000)
    elif preset == "amazon2014_beauty_tiger":
        # TIGER (spec §3.1) on Amazon 2014 Beauty 5-core (~12k items, ~22k users, ~198k reviews): 256-256-256 RQ codes
        # with our OPQ codes as the 4th level (TIGER appends a collision digit instead), a 4+4-layer encoder-decoder
        # d_model 128 / d_ff 1024 / dropout 0.1 (TIGER's T5 has 6 heads of 64; here 4 heads of 32), beam 20, Recall
        # (= HR with one target) and NDCG @5 / @10 on every user's last review (leave_one_out). MiniLM item-title
        # embeddings stand in for TIGER's Sentence-T5 (no hub downloads). Published: R@10 0.0648, NDCG@10 0.0384.
        c.data.update(source="amazon2014", skip_bad_items=True, max_long=20, max_examples=400_000)
        c.sid.update(rq_sizes=(256, 256, 256), last_level_mode="global", kmeans_iters=25, opq_iters=10)
        c.layout.update(max_recent=20)
        c.model.update(d_model=128, encoder_layers=4, decoder_layers=4, heads=4, ffn_dim=1024, dropout=0.1)
        c.trainer.update(batch_size=256, lr=1e-3, warmup_steps=1000, stage1_steps=2_000, stage2_steps=1_000,
                         stage3_steps=30_000, checkpoint_every=2_000, log_every=100)  # fmt: skip
        c.eval.update(num_beams=20, top_k=10, max_pairs=100_000, batch_size=256, unconstrained_pairs=1024,
                      leave_one_out_users=100_000, every_stage=False)  # fmt: skip
    else:
        raise ValueError(
            f"unknown preset {preset!r}; choose cpu_test, cpu_demo, bart_base_paper, kuaisearch_paper, "
            f"amazon2014_beauty_tiger, esci_paper or cpu_test_<source> ({', '.join(CPU_TEST_SOURCES)})"
        )
    return c
