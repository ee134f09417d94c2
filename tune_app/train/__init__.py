"""What runs inside a trial worker: a base model with LoRA, batches, the training step, CUDA graphs, evaluation,
the trainable, and the worker's memory lifetime. Imports tune_app.spec; torch only inside functions."""
