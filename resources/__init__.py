"""paralab.resources: presets, the style sheets and icons; data only."""
