"""Where images land: checked, named safely and written atomically."""
