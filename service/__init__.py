"""imgserve: the HTTP inference service for the trainer's ``.mar`` archives.

``create_app`` (``service.main``) builds the FastAPI app; ``python -m service`` or the
``service`` console script runs it under uvicorn with the settings from the environment.
"""
