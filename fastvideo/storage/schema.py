"""The checkpoint format's version, alone: checkpoint keys hash it, and computing a key
(a warm worker's spec, before torch is imported) must not import the codec."""

SCHEMA_VERSION = 1
