"""Text pipeline, compatible with fastai 2.8.12: rules and tokenizers (`rules`, `tokenizers`), vocabulary
(`vocab`), batches with fixed shapes (`batches`), readers and the prepared-data format (`datasets`), and
parallel cached tokenization with `prepare` behind scripts/prepare_data.py (`pipeline`)."""
