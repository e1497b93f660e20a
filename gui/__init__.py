"""paralab.gui: the Qt desktop app.  Importing this package does not import Qt."""
