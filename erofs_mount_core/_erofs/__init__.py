"""EROFS images synthesized from a tree of entries: metadata built here, file bytes mapped from a stream."""
