"""Word lists of the embedded word-level tokenizer, one module per owner.

Each module defines ``WORDS: tuple[str, ...]`` (pure constants, no imports), so environments and the
demonstration generator can add the words they render without touching each other's lists.
"""
