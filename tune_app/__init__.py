"""tune_app: pick the best model and LoRA settings for text classification with Ray Tune + Optuna TPE + ASHA."""

__version__ = "0.1.0"
