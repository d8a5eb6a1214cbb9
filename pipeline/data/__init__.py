"""Instruction data: annotation formats -> LLaVA conversations, chat templates, label masks, datasets."""
