"""dist_llama: pretrain a LLaMA from scratch with FSDP2 and release it on the Hugging Face Hub."""

__version__ = "0.1.0"
