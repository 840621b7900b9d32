"""Encrypted predictions for buyers (docs/buyer-api.md): the FastAPI service, its HE
worker processes, vouchers and fee settlements (``service``)."""
