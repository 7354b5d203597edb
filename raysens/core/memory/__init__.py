"""Memory of one engine unit: the device budget and chunk sizes (``budget``), out-of-memory recovery
(``oom``), the per-actor memory model used to size units before they run (``sizing``) and the unit's
per-position sums (``unitsums``). Import the modules directly; nothing here loads torch by itself."""
