"""Key ring (credential encryption), API tokens and OAuth state values."""
