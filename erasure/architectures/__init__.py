"""Architecture adapters: one file per model family, each saying which linear maps read the
text, what states they read and how the pipeline samples (``base.Architecture``); ``registry``
finds a pipeline's adapter. The closed forms, fusion and restore (``erasure.methods.pipeline_edit``)
know nothing else of a family, so adding one is one adapter file and its tests."""
