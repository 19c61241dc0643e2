"""Glue to external engines, one file per library, each imported lazily (installed as `vlmcompress.integrations`)."""
