"""Pipeline stages a task passes through: validation, admission, packaging the result."""
