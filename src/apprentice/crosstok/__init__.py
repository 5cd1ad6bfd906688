"""Cross-tokenizer on-policy distillation: a teacher with another tokenizer scores the student's completion text.

token_bytes.py   the exact bytes of every token id of a tokenizer (byte-level BPE, byte fallback, added tokens)
align.py         chunks of a completion where both tokenizations share a byte boundary; per-token values
teacher.py       the teacher-side sequence: its own chat template, its own tokens, its end of turn
scorer.py        the startup probe (same ids? which protocol?), the self-test, and per-sample scoring
"""
