"""The Switchboard API as Python packages generated from ``protos/`` (run ``make proto``)."""
