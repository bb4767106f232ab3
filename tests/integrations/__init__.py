"""Training integrations: transformers Trainer, TRL SFTTrainer, DDP and FSDP (2 processes, gloo, CPU)."""
