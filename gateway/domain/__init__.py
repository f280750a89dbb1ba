"""The domain: records, events, errors and the Store / Bus / Channel protocols.

No I/O and no protobuf here: adapters and front doors depend on this package, never the
other way round.
"""
