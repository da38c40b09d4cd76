"""Serving: model packages, the KServe model server, its API routes and the web page."""
