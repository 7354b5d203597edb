"""The input corpora: which texts a run reads (numpy/pyarrow only; no torch, no Ray).

``reader`` (``Corpus``: a local path, a pyarrow.fs URI, the bundled corpus, a Hugging Face dataset on
disk; ``CorpusError``), ``line_index`` (byte offsets of a text file's lines, cached), ``row_readers``
(Parquet and Hugging Face rows by index) and ``texts`` (the texts behind sample_ids for the report's
views). The run directory — what a run writes — is ``raysens.store``.
"""
