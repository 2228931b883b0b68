"""One small CLI per DVC stage: params -> typed config -> core call -> files (docs/pipeline.md)."""
