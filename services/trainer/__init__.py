"""The trainer service: LoRA fine-tuning jobs that publish adapters for the extractor."""
