"""Image data: the Parquet shard contract, decoding, augmentation and the Ray Data pipeline."""
