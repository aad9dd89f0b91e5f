"""Stage 2: a projector and a LoRA-adapted Qwen2 trained on cached slide tokens; report generation."""
