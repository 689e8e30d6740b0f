"""Sample-quality evaluation compatible with OpenAI ADM's evaluator (SPEC 9)."""
