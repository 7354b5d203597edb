"""The distributed job: work units, the Ray Data pipeline and actor pool, and the driver.

``raysens.pipeline`` is the entry point; these modules are its parts (``work``: units, tokenization,
per-unit computation and partial files, Ray-free; ``raypipe``: Ray Data + actors; ``driver``: run
directory, resume, progress, final merge).
"""
