"""The schema: numbered migrations (tables) beside functions/ (one stored function a file)."""
