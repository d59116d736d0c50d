"""Training, evaluation, diagnosis, data and corpus building, retrieval task prompts.  Stands on model and below."""
