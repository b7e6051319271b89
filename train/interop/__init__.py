"""Other formats in and out: Hugging Face and Meta checkpoints imported, Hugging Face folders exported with their
tokenizer files, and checkpoints read without a process group."""

# Its modules, each imported where it is used: importing the package imports none of them.
__all__ = ["hf_import", "hf_export", "hf_tokenizer", "offline_checkpoint"]
