"""Selection: which backend/variant runs each (pattern, token count). Pure functions plus the table loader."""
