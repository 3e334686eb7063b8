"""Preference training after SFT (DPO / IPO / KTO with TRL 1.x) for the three recipes' models: see train_dpo.py."""
