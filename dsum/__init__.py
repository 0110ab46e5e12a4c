"""dsum: fine-tune and evaluate language models that summarize dialogues, from one CPU to a cluster."""

__version__ = "0.1.0"
