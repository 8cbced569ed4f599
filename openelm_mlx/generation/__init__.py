"""Generation: settings, sampling, the token loop, chat sessions and the tokenizer."""
