"""Named configuration presets (installed as ``smoulder.configs``)."""
