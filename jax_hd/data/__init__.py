"""Data: grain pipelines and validated readers for each on-disk format, plus the embedded default datasets."""
