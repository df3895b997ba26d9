"""Data: sources -> validated manifest -> folds -> subsets -> on-disk image cache -> batches."""
