"""L1: the models as plain PyTorch modules (LM, codec), their checkpoints, prompt and sampling."""
