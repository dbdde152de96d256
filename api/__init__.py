"""The REST service over ``hybrid.HybridRAG`` (FastAPI): ``from api.main import create_app``.

Importing this package is cheap; FastAPI is imported by ``api.main`` and the model is loaded in the
app's lifespan. Run it with ``ttt-rag serve`` (``pip install 'ttt-rag[api]'``).
"""
