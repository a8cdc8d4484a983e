"""Using trained models: load, embed a library, search it, export a self-contained model.

* :func:`load` (``mtrun.load``): a run folder, checkpoint folder or exported folder → a
  :class:`Model` with ``embed_audio``, ``embed_text`` and ``similarity`` (``model.py``);
* ``mtrun embed`` (``library.py``, decoding in ``decode.py``): files, folders and manifests →
  an embeddings file (``store.py``), resumable;
* ``mtrun search`` (``search.py``): text → music and music → music, exact or with FAISS;
* ``mtrun export`` (``export.py``): a folder with everything :func:`load` needs.

See docs/using-models.md.
"""

from __future__ import annotations

from mtrun.inference.model import AudioEmbedding, Model, ModelLoadError, load

__all__ = ["AudioEmbedding", "Model", "ModelLoadError", "load"]
