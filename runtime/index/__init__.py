"""The photo index: a SQLite file of image embeddings kept up to date with a folder, and text search
over it (exact, or approximate for large libraries, optionally reranked by the ITM head).

    from runtime.index import IndexDb, update_index, PhotoSearch
    db = IndexDb.open("photos.db", create=True)
    update_index(db, retriever, "~/Photos", "out/itm")       # retriever = Blip2Retriever.from_artifacts("out/itm")
    hits = PhotoSearch(db, retriever, "out/itm").search("a red bicycle", top=10, rerank=50)
"""

from runtime.index.db import IndexDb, IndexDbError, ModelRecord
from runtime.index.indexer import IndexReport, update_index
from runtime.index.search import Hit, PhotoSearch

__all__ = ["IndexDb", "IndexDbError", "ModelRecord", "IndexReport", "update_index", "Hit", "PhotoSearch"]
