"""HTTP layer: routers, dependencies and error handlers."""
