"""moemerge: merge fine-tuned Mixture-of-Experts checkpoints without breaking their routing."""

__version__ = "0.1.0"
