"""Channel plugins shipped with Switchboard; each package registers itself by entry point."""
