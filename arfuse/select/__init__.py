"""Selection: which backend/variant runs each (pattern, token count). ``policy`` decides (pure functions),
``table`` reads and validates selection tables, ``build`` writes them (from timings or benchmark results)."""
