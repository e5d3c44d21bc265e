"""coreinfer."""
