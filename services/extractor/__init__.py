"""The extractor service: a language model's ratings of words and its hidden states for them."""
