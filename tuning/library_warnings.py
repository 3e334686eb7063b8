"""Warnings the libraries print on every run that a user can do nothing about: silenced once, here, each with its
reason. Anything else still shows. Imported by `tuning/__init__.py`, so every entry point gets it."""
import warnings

# peft 0.21 reads the deprecated `is_gradient_checkpointing` alias of transformers 5.23 on every PeftModel it
# builds (training, inference, merging); the warning names no code of ours and nothing the user set.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
