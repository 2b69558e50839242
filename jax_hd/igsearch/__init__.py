"""IG-Search: search-augmented QA agents trained with GRPO and a step-level information-gain reward."""
