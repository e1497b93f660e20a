"""paralab.core: configuration, devices, strategies, runs and events.  No Qt here."""
