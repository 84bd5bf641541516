"""Ray orchestration: trial driver (shards + TorchTrainer), sweep driver (Tuner + Optuna)."""
