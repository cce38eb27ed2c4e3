"""Manifests: YAML or CSV jobs into validated generation requests (schema, templates, file names, local files)."""
