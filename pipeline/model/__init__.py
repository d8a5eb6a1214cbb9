"""The video-LLM: an ``mm_projector`` from video features into a Hugging Face causal LM's embedding space."""
