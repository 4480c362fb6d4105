"""Where weights come from (registry, download) and how official files become modules (loaders)."""
