"""PTQ launcher: Hydra-configured post-training quantization with NVIDIA ModelOpt."""
