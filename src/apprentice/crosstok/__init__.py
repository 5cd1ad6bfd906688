"""Cross-tokenizer on-policy distillation: a teacher with another tokenizer scores the student's completion text.

token_bytes.py   the exact bytes of every token id of a tokenizer (byte-level BPE, byte fallback, added tokens)
align.py         chunks of a completion where both tokenizations share a byte boundary; per-token values
teacher.py       the teacher-side sequence: its own chat template, its own tokens, its end of turn
endpoint.py      the same from a server that tokenizes with the teacher's template, over one of two protocols:
vllm_tokenize.py     vLLM's POST /tokenize (also `apprentice serve`)
llamacpp_tokenize.py llama.cpp's POST /apply-template + POST /tokenize with pieces
probe.py         the startup probe (same ids? which tokenizer source? which scoring protocol?) and self-test
scorer.py        per-sample scoring: the teacher side, one scoring request, byte alignment
"""
