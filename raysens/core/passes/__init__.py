"""The autodiff passes of the engine: reverse (``reverse``: batched vector-Jacobian products),
forward (``forward``: Jacobian-vector products), cotangent chunking (``cotangents``), the segment
schedule and mode cost model (``schedule``), the vmap fallback chain (``transforms``), probe vectors
(``probes``), compute precision and device checks (``precision``), deterministic softmax backward
(``determinism``) and fused norm forwards (``fused``). Import the modules directly; nothing here loads
torch by itself."""
